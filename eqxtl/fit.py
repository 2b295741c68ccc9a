"""The fine-tuning loop: ``fit``, ``evaluate``, ``predict``, with resumable checkpoints.

``fit`` compiles one train step and one eval step, streams fixed-shape batches (the last
partial batch is padded and masked, so it never recompiles), evaluates every N steps,
shows a progress bar, writes the history (JSON + PNG) and checkpoints (``last`` and
``best``) atomically, and resumes from ``last`` to exactly the weights an uninterrupted run
would have reached: the data order, the augmentation and the step keys are pure functions of
``(seed, epoch, step)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jax.sharding import Mesh

from .data import Augment, Loader, Preprocessing
from .features import FeatureLoader, backbone_frozen, extract_features, head_loss
from .models.heads import Classifier
from .models.registry import preprocessing_for
from .parallel import auto_mesh, replicate
from .train import batched, classification_loss, make_eval_step, make_step


@dataclasses.dataclass
class FitResult:
    """What ``fit`` returns: the trained model and everything needed to continue."""

    model: Any
    state: eqx.nn.State
    opt_state: Any
    history: list[dict]
    step: int
    out_dir: Path | None

    @property
    def final(self) -> dict:
        """The last evaluation record (``test_accuracy``, ``test_loss``, ...)."""
        evals = [h for h in self.history if "test_accuracy" in h]
        return evals[-1] if evals else (self.history[-1] if self.history else {})


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int = 0, end_lr=0.0):
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then cosine to ``end_lr``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, peak_lr, max(warmup_steps, 0), max(total_steps, warmup_steps + 1), end_lr
    )


def _sum_metrics(acc: dict | None, metrics: dict) -> dict:
    keep = {k: metrics[k] for k in ("loss_sum", "correct", "count")}
    return keep if acc is None else jax.tree.map(jnp.add, acc, keep)


def _summarise(acc: dict | None, prefix: str) -> dict:
    if acc is None:
        return {}
    acc = jax.device_get(acc)
    n = max(float(acc["count"]), 1.0)
    return {
        f"{prefix}_loss": float(acc["loss_sum"]) / n,
        f"{prefix}_accuracy": float(acc["correct"]) / n,
    }


def evaluate(
    model,
    state,
    data,
    *,
    batch_size: int = 32,
    preprocessing: Preprocessing | None = None,
    eval_step: Callable | None = None,
    num_workers: int | None = None,
) -> dict:
    """Loss and accuracy of ``model`` on every example of ``data`` (a source or a Loader).

    Returns ``{"loss", "accuracy", "count"}``. No example is dropped: the last batch is
    padded and masked.
    """
    loader = _loader(
        data, model, preprocessing, batch_size, shuffle=False, seed=0, num_workers=num_workers
    )
    eval_step = eval_step or make_eval_step()
    acc = None
    for batch in loader.epoch(0):
        acc = _sum_metrics(acc, eval_step(model, state, batch))
    out = _summarise(acc, "eval")
    return {
        "loss": out["eval_loss"],
        "accuracy": out["eval_accuracy"],
        "count": int(jax.device_get(acc["count"])),
    }


def predict(
    model,
    state,
    images: Sequence[np.ndarray] | np.ndarray,
    *,
    preprocessing=None,
    batch_size: int = 32,
) -> np.ndarray:
    """Class probabilities ``(N, num_classes)`` for uint8 ``(H, W, 3)`` images."""
    from .data import preprocess

    preprocessing = preprocessing or preprocessing_for(model)
    model = eqx.nn.inference_mode(model, True)
    forward = eqx.filter_jit(lambda m, s, x: jax.nn.softmax(batched(m)(x, s)[0], axis=-1))
    out = []
    for start in range(0, len(images), batch_size):
        chunk = [
            preprocess(np.asarray(im), preprocessing) for im in images[start : start + batch_size]
        ]
        x = np.stack(chunk + [chunk[0]] * (batch_size - len(chunk)))  # fixed shape
        out.append(np.asarray(forward(model, state, x))[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _loader(
    data, model, preprocessing, batch_size, *, shuffle, seed, augment=None, num_workers=None
) -> Loader:
    if isinstance(data, Loader):
        return data
    preprocessing = preprocessing or preprocessing_for(model)
    kwargs = {} if num_workers is None else {"num_workers": num_workers}
    return Loader(
        data, preprocessing, batch_size, shuffle=shuffle, seed=seed, augment=augment, **kwargs
    )


# ---------------------------------------------------------------- checkpoints (atomic)

_TRAIN_STATE = "train_state.eqx"
_META = "meta.json"


def _write_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Write a directory's files into a temporary sibling, then swap it in with renames:
    a crash leaves either the old or the new directory complete, never a mix."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-new-"))
    try:
        write(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}-old-{os.getpid()}-{time.time_ns()}")
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _find_checkpoint(out_dir: Path, name: str) -> Path | None:
    path = out_dir / name
    if (path / _META).is_file():
        return path
    # Interrupted between the two renames of _write_dir_atomically: the old copy is whole.
    olds = sorted(out_dir.glob(f".{name}-old-*"), key=lambda p: p.stat().st_mtime)
    olds = [p for p in olds if (p / _META).is_file()]
    return olds[-1] if olds else None


def _save_checkpoint(path: Path, model, state, opt_state, meta: dict) -> None:
    from .adapters import has_adapters, merge_lora, save_adapter
    from .pretrained import save_pretrained

    def write(tmp: Path):
        with open(tmp / _TRAIN_STATE, "wb") as f:
            eqx.tree_serialise_leaves(f, (model, state, opt_state))
        if has_adapters(model):
            # the merged model (what from_pretrained reads), the adapters beside it as PEFT's
            # files; resuming reads the adapted model from the training state
            save_pretrained(merge_lora(model), state, tmp)
            save_adapter(model, tmp, modules_to_save=["head"] if hasattr(model, "head") else [])
        else:
            save_pretrained(model, state, tmp)
        (tmp / _META).write_text(json.dumps(meta, indent=1))

    _write_dir_atomically(path, write)


def _load_checkpoint(path: Path, like):
    with open(path / _TRAIN_STATE, "rb") as f:
        tree = eqx.tree_deserialise_leaves(f, like)
    return tree, json.loads((path / _META).read_text())


def _write_history(out_dir: Path, history: list[dict]) -> None:
    tmp = out_dir / ".history.json.tmp"
    tmp.write_text(json.dumps(history, indent=1))
    os.replace(tmp, out_dir / "history.json")
    try:
        from .plot import plot_history
    except ImportError:  # matplotlib is an optional extra
        return
    plot_history(history, out_dir / "history.png")


# ---------------------------------------------------------------- fit


def fit(
    model,
    state: eqx.nn.State,
    optimizer: optax.GradientTransformation,
    spec,
    train_data,
    *,
    test_data=None,
    epochs: int = 1,
    steps: int | None = None,
    batch_size: int = 32,
    eval_every: int | None = None,
    label_smoothing: float = 0.0,
    augment: Augment | None = None,
    preprocessing: Preprocessing | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    checkpoint_every: int | None = None,
    train_bn: bool = False,
    progress: bool = True,
    num_workers: int | None = None,
    callback: Callable[[int, dict], None] | None = None,
    cache_features: bool | str | os.PathLike = True,
    compute_dtype=None,
    mesh: Mesh | None | str = "auto",
) -> FitResult:
    """Fine-tune ``model`` (a ``Classifier``): only the leaves ``spec`` marks train.

    **Arguments:**

    - `optimizer`, `spec`: e.g. from ``eqxtl.param_groups`` (or any optax transformation
      and a filter spec); the optimizer sees the trainable partition only.
    - `train_data`, `test_data`: sources (``TFDSSource``, ``ImageFolder``, ``ArraySource``)
      or ``Loader``s; preprocessing defaults to the checkpoint's (``preprocessing_for``).
    - `epochs` or `steps`: how long (``steps`` wins when given).
    - `eval_every`: evaluate on ``test_data`` every N steps (and at the end).
    - `out_dir`: where ``last/`` and ``best/`` checkpoints (``save_pretrained`` layout plus
      the training state), ``history.json`` and ``history.png`` go; with ``resume`` a run
      continues from ``out_dir/last``.
    - `callback(step, record)`: called after each step with the step's metrics (host
      values, so it syncs: keep it for tests and logging).
    - `cache_features`: when nothing in the backbone trains (and there is no augmentation
      and no ``train_bn``), run the backbone once over the data (``extract_features``) and
      train the head on the cached features: the same result, epochs after the first cost
      only the head. ``True``: in memory; a directory: on disk, reused across runs;
      ``False``: always run the backbone.
    - `compute_dtype`: e.g. ``jnp.bfloat16`` for mixed precision (see
      ``classification_loss``); weights and optimizer state stay float32.
    - `mesh`: data parallelism (``eqxtl.data_mesh``); ``"auto"`` uses every local device
      when there is more than one (the batch size must then be a multiple of their count),
      ``None`` one device.
    """
    out_dir = Path(out_dir) if out_dir is not None else None
    train = _loader(
        train_data,
        model,
        preprocessing,
        batch_size,
        shuffle=True,
        seed=seed,
        augment=augment,
        num_workers=num_workers,
    )
    test = None
    if test_data is not None:
        test = _loader(
            test_data,
            model,
            preprocessing,
            batch_size,
            shuffle=False,
            seed=seed,
            num_workers=num_workers,
        )
    steps_per_epoch = len(train)
    if steps_per_epoch == 0:
        raise ValueError("The training data is empty.")
    total = steps if steps is not None else epochs * steps_per_epoch
    mesh = auto_mesh() if mesh == "auto" else mesh
    loss_fn, eval_loss_fn = classification_loss, classification_loss
    if _can_cache(model, spec, train, train_bn, cache_features):
        cache_dir = None if cache_features is True else cache_features
        train, test = (
            None
            if loader is None
            else FeatureLoader(
                extract_features(
                    model,
                    state,
                    loader,
                    cache_dir=cache_dir,
                    batch_size=batch_size,
                    progress=progress,
                ),
                loader,
            )
            for loader in (train, test)
        )
        loss_fn, eval_loss_fn = head_loss, head_loss
    step_fn = make_step(
        loss_fn(label_smoothing=label_smoothing, compute_dtype=compute_dtype),
        optimizer,
        spec,
        train_bn=train_bn,
        mesh=mesh,
    )
    eval_step = make_eval_step(eval_loss_fn(compute_dtype=compute_dtype), mesh=mesh)
    opt_state = optimizer.init(eqx.filter(model, spec))

    step, history, best = 0, [], -math.inf
    if out_dir is not None and resume:
        found = _find_checkpoint(out_dir, "last")
        if found is not None:
            (model, state, opt_state), meta = _load_checkpoint(found, (model, state, opt_state))
            step, history, best = meta["step"], meta["history"], meta["best"]

    # The step may donate what trains: work on a copy so that the caller's model stays usable
    # (e.g. for a second fit from the same pretrained weights).
    trainable, frozen = eqx.partition(model, spec)
    model = eqx.combine(jtu.tree_map(jnp.copy, trainable), frozen)
    if mesh is not None:
        model, state, opt_state = replicate((model, state, opt_state), mesh)
    base_key = jax.random.key(seed)
    bar = _progress(total, step, progress)
    acc, window_start, window_images = None, time.perf_counter(), 0

    def evaluate_now() -> dict:
        nonlocal best
        record: dict = {"step": step, "epoch": step / steps_per_epoch}
        record.update(_summarise(acc, "train"))
        record["images_per_sec"] = window_images / max(time.perf_counter() - window_start, 1e-9)
        if test is not None:
            test_acc = None
            for batch in test.epoch(0):
                test_acc = _sum_metrics(test_acc, eval_step(model, state, batch))
            record.update(_summarise(test_acc, "test"))
        history.append(record)
        metric = record.get("test_accuracy", -record.get("train_loss", math.inf))
        if out_dir is not None:
            meta = {"step": step, "history": history, "best": max(best, metric), "seed": seed}
            if metric > best:
                _save_checkpoint(out_dir / "best", model, state, opt_state, meta)
            _save_checkpoint(out_dir / "last", model, state, opt_state, meta)
            _write_history(out_dir, history)
        best = max(best, metric)
        return record

    try:
        while step < total:
            epoch, start = divmod(step, steps_per_epoch)
            for batch in train.epoch(epoch, start_step=start):
                key = jax.random.fold_in(base_key, step)
                model, state, opt_state, metrics = step_fn(model, state, opt_state, batch, key)
                acc = _sum_metrics(acc, metrics)
                step += 1
                window_images += int(np.sum(batch["mask"]))
                if callback is not None:
                    callback(step, jax.device_get(metrics))
                if bar is not None and (step % 10 == 0 or step == total):
                    bar.set_postfix(_postfix(acc, window_images, window_start), refresh=False)
                if bar is not None:
                    bar.update(1)
                evaluating = eval_every and step % eval_every == 0
                if evaluating or step == total:
                    record = evaluate_now()
                    if bar is not None:
                        bar.set_postfix(_postfix(acc, window_images, window_start, record))
                    acc, window_start, window_images = None, time.perf_counter(), 0
                elif out_dir is not None and checkpoint_every and step % checkpoint_every == 0:
                    meta = {"step": step, "history": history, "best": best, "seed": seed}
                    _save_checkpoint(out_dir / "last", model, state, opt_state, meta)
                if step >= total:
                    break
    finally:
        if bar is not None:
            bar.close()
    return FitResult(model, state, opt_state, history, step, out_dir)


def _can_cache(model, spec, train, train_bn, cache_features) -> bool:
    return (
        cache_features is not False
        and not train_bn
        and isinstance(train, Loader)
        and train.augment is None
        and isinstance(model, Classifier)
        and backbone_frozen(model, spec)
    )


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _postfix(acc, images, since, record=None) -> dict:
    out = {}
    if acc is not None:
        s = _summarise(acc, "train")
        out = {"loss": f"{s['train_loss']:.3f}", "acc": f"{s['train_accuracy']:.3f}"}
    out["img/s"] = f"{images / max(time.perf_counter() - since, 1e-9):.1f}"
    if record and "test_accuracy" in record:
        out["test_acc"] = f"{record['test_accuracy']:.3f}"
    return out
