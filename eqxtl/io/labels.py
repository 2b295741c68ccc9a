"""What a fine-tuned ``Classifier`` folder records besides its weights: class names (as
transformers writes them: ``id2label`` / ``label2id`` in ``config.json``) and the
preprocessing used in training (``"eqxtl": {"head": true, "preprocessing": {...}}``).
``save_pretrained`` writes them, ``from_pretrained`` reads them back."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from ..errors import CheckpointError
from ..models._arch import Preprocessing


def head_config(model) -> dict[str, Any]:
    """``config.json`` entries for a ``Classifier`` (merged over the architecture's)."""
    out: dict[str, Any] = {"eqxtl": {"head": True}}
    names = getattr(model, "class_names", None)
    if names is not None:
        out["id2label"] = {str(i): name for i, name in enumerate(names)}
        out["label2id"] = {name: i for i, name in enumerate(names)}
    if getattr(model, "preprocessing", None) is not None:
        out["eqxtl"]["preprocessing"] = dataclasses.asdict(model.preprocessing)
    return out


def add_training_info(model, configs: dict[str, dict], layout: str) -> None:
    """A classifier's class names and training preprocessing, into ``config.json`` or else
    the layout's first config file (``from_pretrained`` reads them from either)."""
    if not configs:
        unsaved = (
            ", and its class names and training preprocessing are not saved"
            if model.class_names is not None or model.preprocessing is not None
            else ""
        )
        # without a config, the folder reads like a pretrained checkpoint, whose head
        # from_pretrained drops by default
        warnings.warn(
            f"save_pretrained: the {layout} layout has no config file, so "
            "from_pretrained(folder) cannot tell the classifier from a pretrained checkpoint "
            f"and loads the backbone alone unless keep_head=True (its {model.num_classes} "
            f"classes){unsaved}. Save in the default layout (layout=None) to keep it whole.",
            stacklevel=4,
        )
        return
    name = "config.json" if "config.json" in configs else next(iter(configs))
    configs[name] = {**configs[name], **head_config(model)}


def written_by_eqxtl(hf_config: dict | None) -> bool:
    """Whether ``config.json`` is a ``Classifier``'s, written by ``save_pretrained``."""
    return isinstance(hf_config, dict) and bool((hf_config.get("eqxtl") or {}).get("head"))


def training_info(hf_config: dict, source: str) -> dict[str, Any]:
    """``{"class_names", "preprocessing"}`` from an eqxtl ``config.json``."""
    out: dict[str, Any] = {"class_names": None, "preprocessing": None}
    id2label = hf_config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            out["class_names"] = [id2label[str(i)] for i in range(len(id2label))]
        except KeyError:
            raise CheckpointError(
                f"{source}: config.json's id2label must map 0..{len(id2label) - 1} to names; "
                f"got keys {sorted(id2label)[:5]}."
            ) from None
    stored = (hf_config.get("eqxtl") or {}).get("preprocessing")
    if stored is not None:
        try:
            stored = dict(stored)
            stored["mean"], stored["std"] = tuple(stored["mean"]), tuple(stored["std"])
            out["preprocessing"] = Preprocessing(**stored)
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"{source}: config.json's eqxtl.preprocessing is not valid ({e})."
            ) from None
    return out
