"""A fine-tuned model published on the Hugging Face Hub: the ``save_pretrained`` folder plus
a model card (``README.md`` whose YAML front matter the Hub indexes: ``library_name``,
``base_model``, tags, datasets, and the evaluation results as ``model-index``)."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import equinox as eqx

from ..errors import SourceError
from ..models.heads import Classifier
from ..models.registry import architecture_of
from . import hub
from .pretrained import save_pretrained

CARD_FILE = "README.md"


def push_to_hub(
    model: eqx.Module,
    state: eqx.nn.State | None,
    repo_id: str,
    *,
    base_model: str | None = None,
    datasets: Sequence[str] = (),
    metrics: Mapping[str, float] | None = None,
    tags: Sequence[str] = (),
    layout: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    local_dir: str | os.PathLike | None = None,
) -> str:
    """Publish ``model`` to the Hugging Face Hub repo ``repo_id`` (created if needed):
    the folder ``save_pretrained(model, state, dir, layout=layout)`` writes, so that
    ``eqxtl.from_pretrained(repo_id)`` (and transformers / timm / open_clip, as the layout
    says) reads it, plus a model card ``README.md``.

    The folder is staged in a temporary folder (removed afterwards, whatever happens) and
    uploaded in one commit. Offline (``HF_HUB_OFFLINE=1``) nothing is written and a
    ``SourceError`` says so; a failed upload (no connection, no write access) is a
    ``SourceError`` too, with nothing left behind but ``local_dir``.

    **Arguments:**

    - `model`, `state`: as ``fit`` or ``from_pretrained`` return them (adapters merged:
      ``eqxtl.merge_lora``).
    - `repo_id`: ``"user/name"``.
    - `base_model`: the hub id it was fine-tuned from (``"timm/resnet50.a1_in1k"``), for the
      card's ``base_model``.
    - `datasets`: the training data's hub ids (or names), for the card's ``datasets``; the
      first one names the evaluation data in ``model-index``.
    - `metrics`: the run's evaluation, e.g. ``fit(...).final``: each number named
      ``test_<metric>`` becomes a ``model-index`` result ``<metric>``; every number is
      listed in the card's text.
    - `tags`: more tags (``eqxtl``, the architecture and the task are always there).
    - `layout`: as ``save_pretrained``'s.
    - `private`, `token`: as ``huggingface_hub.HfApi.create_repo``'s.
    - `local_dir`: also keep the published folder here (written atomically, before the
      upload).

    **Returns:** the URL of the repo.
    """
    from huggingface_hub import HfApi

    if not isinstance(repo_id, str) or not hub._REPO_ID.match(repo_id):
        raise ValueError(f"push_to_hub: repo_id must be 'user/name', got {repo_id!r}.")
    if hub._offline():
        raise SourceError(
            f"push_to_hub: the Hugging Face Hub is switched off (HF_HUB_OFFLINE is set), so "
            f"{repo_id} was not written (nor anything else). Unset HF_HUB_OFFLINE on a "
            "machine with network access, or keep the folder with save_pretrained."
        )
    with tempfile.TemporaryDirectory(prefix="eqxtl-push-") as staging:
        folder = Path(staging, "model")
        save_pretrained(model, state, folder, layout=layout)
        card = _model_card(model, repo_id, base_model, datasets, metrics, tags)
        (folder / CARD_FILE).write_text(card, encoding="utf-8")
        if local_dir is not None:
            _copy_atomically(folder, local_dir)
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message="Upload fine-tuned model with eqxtl",
            )
        except OSError as e:  # requests' connection and HTTP errors, OfflineModeIsEnabled
            raise SourceError(
                f"push_to_hub: uploading to {repo_id} failed ({type(e).__name__}: {e}). "
                "Check the network and that the token (huggingface-cli login, or token=) "
                "may write there; run the call again to retry."
            ) from e
    return str(url)


def _copy_atomically(folder: Path, local_dir) -> None:
    from .._util.atomic import atomic_directory

    files = sorted(p.name for p in folder.iterdir())
    replacing = {*files, *hub.weight_files(), *hub.config_files()}
    with atomic_directory(local_dir, replacing=replacing) as tmp:
        for name in files:
            shutil.copy2(folder / name, Path(tmp, name))


def _model_card(model, repo_id, base_model=None, datasets=(), metrics=None, tags=()) -> str:
    """The ``README.md`` ``push_to_hub`` writes: YAML front matter (parsed by
    ``huggingface_hub.ModelCard``) and a short text."""
    from huggingface_hub import EvalResult, ModelCardData

    backbone = model.backbone if isinstance(model, Classifier) else model
    arch = architecture_of(backbone).name
    task = "image-classification" if isinstance(model, Classifier) else "image-feature-extraction"
    numbers = {
        str(k): float(v)
        for k, v in (metrics or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    dataset = datasets[0] if datasets else "custom"
    results = [
        EvalResult(
            task_type=task,
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split="test",
            metric_type=name.removeprefix("test_"),
            metric_value=value,
        )
        for name, value in numbers.items()
        if name.startswith("test_")
    ]
    data = ModelCardData(
        library_name="eqxtl",
        base_model=base_model,
        datasets=list(datasets) or None,
        tags=list(dict.fromkeys(["eqxtl", "jax", "equinox", arch, task, *tags])),
        pipeline_tag=task,
        model_name=repo_id.split("/")[-1],
        eval_results=results or None,
    )
    return _card_text(data, model, repo_id, base_model, numbers)


def _card_text(data, model, repo_id, base_model, numbers: dict[str, float]) -> str:
    names = getattr(model, "class_names", None)
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        "Fine-tuned with eqxtl (transfer learning in JAX with Equinox)"
        + (f" from `{base_model}`." if base_model else "."),
        "",
        "```python",
        "import eqxtl",
        "",
        f'model, state = eqxtl.from_pretrained("{repo_id}")',
        "```",
    ]
    if names:
        lines += ["", f"Classes ({len(names)}): " + ", ".join(f"`{n}`" for n in names) + "."]
    if numbers:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in numbers.items()]
    return "\n".join(lines) + "\n"
