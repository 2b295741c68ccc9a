"""What eqxtl needs to know about one architecture to load, infer and save it.

Each backbone module (``clip.py``, ``resnet.py``, ...) exports one ``Architecture``; the
generic loader in ``checkpoint.py`` only talks to this interface.

Vocabulary:
- *canonical names*: the dotted leaf paths of the eqxtl backbone (``eqxtl.paths``), which
  are the transformers names without a model prefix. A checkpoint's pretrained
  classification head, when there is one, is canonicalised to ``head.weight`` /
  ``head.bias``.
- *shapes*: ``dict[str, tuple[int, ...]]`` of a checkpoint, used to detect and infer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

Shapes = Mapping[str, tuple[int, ...]]
Tensors = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    """Short name, e.g. ``"clip_vision"``, ``"resnet"``, ``"efficientnet_lite"``."""
    model_types: tuple[str, ...]
    """transformers ``config.json`` ``model_type`` values this architecture reads."""
    config_cls: type
    """A frozen dataclass whose fields mirror the transformers config's."""
    build: Callable[[Any, Any], Any]
    """``build(config, key) -> backbone``: random init (run under ``eqx.filter_eval_shape``
    by the loader, so it never allocates)."""
    detect: Callable[[Shapes], bool]
    """True when a checkpoint's keys (any supported layout) belong to this architecture."""
    canonical_name: Callable[[str], str | None]
    """Maps one checkpoint key (any supported layout, any known prefix) to its canonical
    name; ``None`` for keys that are known and dropped (buffers such as ``position_ids``,
    ``num_batches_tracked``, CLIP's text tower). Unknown keys map to themselves (and are then
    reported as unexpected)."""
    infer_config: Callable[[Shapes], Any]
    """Config from the canonical shapes alone (for a bare ``.safetensors`` file)."""
    config_from_hf: Callable[[Mapping[str, Any]], Any]
    """Config from a transformers ``config.json`` dict (CLIPModel's nested one too)."""
    config_to_hf: Callable[[Any, int | None], dict]
    """``config_to_hf(config, num_labels)``: a transformers ``config.json`` dict. With
    ``num_labels`` the classification variant (e.g. ``ResNetForImageClassification``)."""
    hf_name: Callable[[str, bool], str]
    """``hf_name(canonical, with_head)``: canonical name -> transformers key for saving
    (``with_head``: the file is the classification variant, e.g. ``resnet.`` prefix)."""
    feature_dim: Callable[[Any], int]
    """Size of the pooled features for a config (what a head takes)."""
    reconcile: Callable[[Any, Shapes], Any] = lambda config, shapes: config
    """Adjust a config read from ``config.json`` to what the checkpoint holds (canonical
    shapes), e.g. whether CLIP's optional visual projection is present."""
