"""The architecture plug-in: everything eqxtl needs to know about one backbone family.

Each backbone module (``clip.py``, ``resnet.py``, ...) declares one ``Architecture`` and
nothing else in eqxtl names it: the loader, ``save_pretrained``, ``preprocessing_for``,
``last_blocks`` / layer-wise decay, type rules and the alias registry all ask it. Adding an
architecture = one file in ``models/`` + one line in ``registry.py``.

Vocabulary:

- *canonical names*: the dotted leaf paths of the eqxtl backbone (``eqxtl.paths``), the
  transformers names without a model prefix. A checkpoint's classification head, when
  there is one, is canonicalised to ``head.weight`` / ``head.bias``.
- *layout*: one way checkpoints of the family are written (``transformers``, ``timm``,
  ``open_clip``, ``torchvision``, ...): a two-way key map with tensor surgery
  (``_layout.KeyMap``), how to recognise it, the config files that sit beside its weights
  and how to read / write them.
- *meta*: ``{file name: parsed JSON}`` of the config files found beside the weights
  (``config.json``, ``open_clip_config.json``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, DataError
from ._layout import KeyMap, Plan, strip_wrappers

Shapes = Mapping[str, tuple[int, ...]]
Meta = Mapping[str, Mapping[str, Any]]

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a checkpoint wants its input: ``(resize(image) -> center crop) * scale``, then
    ``(x - mean) / std`` per channel, channels first.

    **Fields:**

    - `resize`: length of the shortest side after resizing (aspect ratio kept).
    - `crop`: side of the square center crop; the output is ``(3, crop, crop)``.
    - `mean`, `std`: per-channel (R, G, B) statistics on the scaled (``0..1``) range.
    - `scale`: multiplies the uint8 pixel values before normalising (``1/255``).
    - `interpolation`: PIL resampling filter, ``"bicubic"``, ``"bilinear"``, ``"nearest"``,
      ``"lanczos"``, ``"box"`` or ``"hamming"``.
    - `squash`: resize both sides straight to ``crop`` (aspect ratio not kept, no crop), as
      SigLIP's image processor and big_vision do, instead of shortest side + center crop.
    """

    resize: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    scale: float = 1 / 255
    interpolation: str = "bicubic"
    squash: bool = False

    def __post_init__(self):
        for name in ("mean", "std"):  # tuples of floats: hashable, comparable
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.resize < 1 or self.crop < 1:
            raise DataError(f"resize and crop must be >= 1, got {self.resize}, {self.crop}.")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise DataError("mean and std need one value per RGB channel (3 each).")
        if self.interpolation not in INTERPOLATIONS:
            raise DataError(
                f"Unknown interpolation {self.interpolation!r}; use one of {INTERPOLATIONS}."
            )

    @classmethod
    def from_timm(cls, cfg: Mapping[str, Any]) -> Preprocessing:
        """From a timm ``pretrained_cfg`` (``input_size``, ``crop_pct``, ``interpolation``,
        ``mean``, ``std``): resize = ``floor(crop / crop_pct)`` as timm's eval transform."""
        crop = int(cfg.get("input_size", (3, 224, 224))[-1])
        crop_pct = float(cfg.get("crop_pct", 0.875) or 1.0)
        interpolation = cfg.get("interpolation", "bicubic")
        return cls(
            resize=int(crop / crop_pct),
            crop=crop,
            mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
        )

    def at_size(self, size: int | None) -> Preprocessing:
        """The same preprocessing for a ``size`` crop (resize scaled alike); ``None``: as is
        (a model without a fixed input size)."""
        if size is None or size == self.crop:
            return self
        return dataclasses.replace(self, resize=round(self.resize * size / self.crop), crop=size)

    def to_timm(self) -> dict[str, Any]:
        """Inverse of ``from_timm`` (the fields timm's ``pretrained_cfg`` uses)."""
        return {
            "input_size": [3, self.crop, self.crop],
            "crop_pct": self.crop / self.resize,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclasses.dataclass(frozen=True)
class Layout:
    """One checkpoint layout of an architecture."""

    name: str
    """``"transformers"``, ``"timm"``, ``"open_clip"``, ``"torchvision"``, ..."""
    keys: KeyMap
    """Two-way key map with tensor surgery."""
    signature: tuple[str, ...]
    """Checkpoint keys (after training-wrapper prefixes are stripped) that all occur in every
    checkpoint of this layout: how it is recognised from the weights alone."""
    claims: Callable[[Meta], bool] = lambda meta: False
    """True when a config file beside the weights says it is this layout (e.g. timm's
    ``config.json`` naming a ResNet architecture)."""
    read_config: Callable[[Meta, Shapes], Any] = lambda meta, shapes: None
    """Config from the files beside the weights and the canonical shapes; ``None`` when
    they say nothing (the config is then inferred from the shapes)."""
    write_config: Callable[[Any, dict], dict[str, dict]] = lambda config, extra: {}
    """``write_config(config, extra) -> {file name: JSON dict}`` written beside saved
    weights; ``extra`` has ``num_labels`` (or None) and ``preprocessing``."""
    preprocessing: Callable[[Meta], Preprocessing | None] = lambda meta: None
    """The preprocessing stated by the files beside the weights (timm ``pretrained_cfg``,
    open_clip ``preprocess_cfg``), if any."""
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Config fields the weights cannot tell, at this layout's library default; used (with
    a warning) when no config file states them and no argument does."""
    weights_file: str = "model.safetensors"
    """The file name ``save_pretrained`` writes the weights to."""
    files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    """The weight file names checkpoints of this layout are published under (what the
    loader looks for in a folder or a hub repo)."""
    config_files: tuple[str, ...] = ("config.json",)
    """The config files this layout reads beside the weights (``meta``'s keys)."""
    default_hints: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """``{field: example}`` said when a field of ``defaults`` is used, e.g. which value
    which weights need."""
    check: Callable[[Mapping[str, Any]], None] = lambda tensors: None
    """Raises ``CheckpointError`` for a checkpoint (key -> tensor, read on demand) that this
    layout's map would load wrongly (e.g. a non-zero bias the map drops)."""
    classifier_keys: KeyMap | None = None
    """For a layout whose ``keys`` read the checkpoint's ``head`` as part of the backbone
    (timm's CLIP towers: there ``head`` is the image projection), the map for the
    checkpoints whose ``head`` is a classifier instead (timm's ImageNet fine-tunes). Used on
    load when ``has_classifier`` says so, and on save for a ``Classifier`` whose every tensor
    it names (a tower without a projection)."""
    has_classifier: Callable[[Meta, Mapping[str, Any]], bool] = lambda meta, tensors: False
    """Whether a checkpoint (its config files, key -> tensor read on demand) holds a
    classification head, to be read with ``classifier_keys``."""
    foreign_head: Callable[[Meta], str | None] = lambda meta: None
    """Why the checkpoint's classification head (its config files say) cannot sit on this
    backbone, e.g. one trained on other features than the backbone's; ``None``: it can.
    ``from_pretrained(..., keep_head=True)`` refuses such a head."""
    variant: Callable[[Mapping[str, Any]], KeyMap | None] = lambda tensors: None
    """For a layout whose keys alone do not tell how to read a checkpoint (timm names the
    packed SwiGLU MLP of DINOv2-giant ``mlp.fc1``, as the plain MLP), the key map that reads
    this one, from its tensors (key -> tensor, read on demand); ``None``: ``keys``. ``keys``
    still saves every canonical name a variant reads."""

    @property
    def writable(self) -> bool:
        """Whether ``save_pretrained`` can write this layout (vit_jax / big_vision ``.npz``
        layouts are read only)."""
        from ._layout import Map

        return any(isinstance(rule, Map) and rule.save for rule in self.keys.rules)


HEAD_NAMES = ("head.weight", "head.bias")
"""The canonical names of a checkpoint's classification head (other ``head.*`` names belong
to the backbone, e.g. SigLIP's attention-pooling ``head.probe``)."""


_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "projection_dim",
    "vocab_size",
    "max_position_embeddings",
    "embedding_size",
    "hidden_sizes",
    "tokens_mlp_dim",
    "channels_mlp_dim",
    "stem_size",
    "head_size",
    "depth_divisor",
)
_COUNTS = ("num_hidden_layers", "num_blocks")
_OPTIONAL = ("projection_dim",)  # None: no projection
_RATES = ("drop_path_rate",)

TRAINING_FIELDS = ("drop_path_rate",)
"""Config fields that are training choices, not the checkpoint's: the readers never take
them from a file and ``transformers_write`` never writes them (the saved files of a model do
not depend on them); ``from_pretrained(..., drop_path_rate=0.1)`` sets them (each
architecture lists them in its ``choices``)."""


def check_activation(config: Any, allowed: tuple[str, ...]) -> None:
    """A ``ValueError`` naming ``config.hidden_act`` unless it is one of ``allowed``."""
    if config.hidden_act not in allowed:
        raise ValueError(f"hidden_act {config.hidden_act!r} is not one of {allowed}.")


def check_sizes(config: Any) -> None:
    """Every size field of a config that it has (``hidden_size``, ``image_size``,
    ``patch_size``, ...) an integer >= 1 (``projection_dim`` may be ``None``),
    layer counts >= 0: a ``ValueError`` naming the field, before any division by it."""
    for field in dataclasses.fields(config):
        if field.name not in _SIZES + _COUNTS:
            continue
        value = getattr(config, field.name)
        if value is None and (field.default is None or field.name in _OPTIONAL):
            continue
        low = 1 if field.name in _SIZES else 0
        values = value if isinstance(value, (tuple, list)) else (value,)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values):
            raise ValueError(
                f"{type(config).__name__}: {field.name} must be an integer >= {low} "
                f"(or a pair of them for an image size), got {value!r}."
            )
    check_rates(config)


def check_rates(config: Any) -> None:
    """Every rate field of a config that it has (``drop_path_rate``) a number in ``[0, 1)``:
    a ``ValueError`` naming the field."""
    for name in _RATES:
        if not hasattr(config, name):
            continue
        value = getattr(config, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and 0 <= value < 1):
            raise ValueError(
                f"{type(config).__name__}: {name} must be a number in [0, 1) (the stochastic "
                f"depth of the last block; 0 turns it off), got {value!r}."
            )


def transformers_meta(meta: Meta, *model_types: str) -> Mapping[str, Any] | None:
    """transformers' ``config.json``, if one sits beside the weights and its ``model_type``
    is one of ``model_types``."""
    cfg = meta.get("config.json")
    return cfg if cfg is not None and cfg.get("model_type") in model_types else None


def transformers_head_reads(
    classes: tuple[str, ...], features: str
) -> Callable[[Meta], str | None]:
    """``Layout.foreign_head`` for transformers classes (``config.json``'s ``architectures``)
    whose classifier reads ``features``, not the backbone's own."""

    def why(meta: Meta) -> str | None:
        hf = meta.get("config.json") or {}
        named = [a for a in hf.get("architectures") or () if a in classes]
        if not named:
            return None
        return f"it is a transformers {named[0]} head, trained on {features}"

    return why


def claims_transformers(*model_types: str) -> Callable[[Meta], bool]:
    """``Layout.claims`` for folders whose ``config.json`` has one of ``model_types``."""
    return lambda meta: transformers_meta(meta, *model_types) is not None


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def transformers_write(
    model_type: str,
    architecture: str | None,
    config: Any,
    extra: Mapping[str, Any],
    *,
    skip: tuple[str, ...] = (),
    num_labels: bool = True,
    **fields: Any,
) -> dict[str, dict]:
    """``Layout.write_config`` body for transformers folders: a ``config.json`` with
    ``model_type``, ``architectures: [architecture]`` (none for ``None``), every field of
    ``config`` but ``skip`` (tuples as lists), ``num_labels`` when a head is saved (unless
    ``num_labels=False``: the transformers class of that name pools differently) and
    ``fields``. ``TRAINING_FIELDS`` are never written."""
    skip = (*skip, *TRAINING_FIELDS)
    out = {
        "model_type": model_type,
        **({} if architecture is None else {"architectures": [architecture]}),
        **{
            f.name: _json(getattr(config, f.name))
            for f in dataclasses.fields(config)
            if f.name not in skip
        },
        **fields,
    }
    if num_labels and extra["num_labels"] is not None:
        out["num_labels"] = extra["num_labels"]
    return {"config.json": out}


def timm_meta(meta: Meta) -> Mapping[str, Any] | None:
    """timm's hub ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg``; no
    transformers ``model_type``), if that is what sits beside the weights."""
    cfg = meta.get("config.json")
    if cfg is None or "architecture" not in cfg or "model_type" in cfg:
        return None
    return cfg


def claims_timm(architectures: str) -> Callable[[Meta], bool]:
    """``Layout.claims`` for timm hub folders whose ``architecture`` (tag stripped) fully
    matches the regex ``architectures``."""

    def claims(meta: Meta) -> bool:
        cfg = timm_meta(meta)
        name = str(cfg["architecture"]).split(".")[0] if cfg is not None else ""
        return cfg is not None and re.fullmatch(architectures, name) is not None

    return claims


def timm_preprocessing(meta: Meta) -> Preprocessing | None:
    """``Layout.preprocessing`` from timm's ``pretrained_cfg``."""
    cfg = timm_meta(meta)
    return None if cfg is None else Preprocessing.from_timm(cfg.get("pretrained_cfg") or {})


def timm_write(
    architecture: str,
    extra: Mapping[str, Any],
    model_args: Mapping[str, Any],
    *,
    num_features: int,
    global_pool: str,
    num_classes: int | None = None,
    **pretrained_cfg: Any,
) -> dict[str, dict]:
    """``Layout.write_config`` body for timm hub folders: the ``config.json`` timm's
    ``save_for_hf`` writes (``architecture``, ``num_classes``, ``num_features``,
    ``global_pool``, ``model_args``, ``pretrained_cfg``). ``num_classes``: of timm's head
    (default: the saved head's, 0 without one); ``pretrained_cfg``: entries added to or
    replacing the preprocessing's (``Preprocessing.to_timm``)."""
    num_classes = (extra["num_labels"] or 0) if num_classes is None else num_classes
    pre: Preprocessing = extra["preprocessing"]
    return {
        "config.json": {
            "architecture": architecture,
            "num_classes": num_classes,
            "num_features": num_features,
            "global_pool": global_pool,
            "model_args": {**model_args, "num_classes": num_classes, "global_pool": global_pool},
            "pretrained_cfg": {**pre.to_timm(), "num_classes": num_classes, **pretrained_cfg},
        }
    }


def timm_vit_write(
    architecture: str,
    config: Any,
    extra: Mapping[str, Any],
    model_args: Mapping[str, Any],
    *,
    global_pool: str,
    **pretrained_cfg: Any,
) -> dict[str, dict]:
    """``timm_write`` for a timm ``VisionTransformer``-like model whose ``config`` has
    ``hidden_size``, ``hidden_act``, ``num_channels`` and ``image_size`` (int or
    ``(h, w)``): ``img_size``, ``in_chans`` and the activation join ``model_args``."""
    size = config.image_size
    h, w = (size, size) if isinstance(size, int) else size
    args = {**model_args, "img_size": [h, w], "in_chans": config.num_channels}
    if config.hidden_act not in TIMM_ACTIVATIONS:
        raise CheckpointError(
            f"timm's {architecture} has no {config.hidden_act!r} activation (it builds "
            f"{' or '.join(TIMM_ACTIVATIONS)}): save this model with layout='transformers'."
        )
    if config.hidden_act != "gelu":  # timm builds nn.GELU (exact) unless told
        args["act_layer"] = "gelu_tanh"
    return timm_write(
        architecture,
        extra,
        args,
        num_features=config.hidden_size,
        global_pool=global_pool,
        input_size=[config.num_channels, h, w],
        **pretrained_cfg,
    )


def unclaimed_config(meta: Meta) -> str | None:
    """What a config file beside the weights says the checkpoint is, when it names a model
    of a library whose layouts eqxtl reads (used when no layout claims it); else None."""
    cfg = timm_meta(meta)
    if cfg is None:
        return None
    return f"its timm config.json names architecture {cfg['architecture']!r}"


TIMM_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new")
"""The ``hidden_act`` values a timm ViT-like ``config.json`` can state (``timm_act`` reads
the tanh approximation back as ``gelu_pytorch_tanh``, the same function as ``gelu_new``)."""


def timm_act(meta_args: Mapping[str, Any]) -> str:
    """The ``hidden_act`` of timm ``model_args``: its ``act_layer`` ``gelu_tanh`` is
    transformers' ``gelu_pytorch_tanh``; timm's default nn.GELU is exact ``gelu``."""
    return (
        "gelu_pytorch_tanh" if meta_args.get("act_layer") in ("gelu_tanh", "gelu_new") else "gelu"
    )


def count_blocks(shapes: Shapes, prefix: str) -> int:
    """``1 + max N`` over the canonical names ``{prefix}N.*`` (0 when there is none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def square_side(patches: int) -> int:
    """The side of a square grid of ``patches``; ``CheckpointError`` when there is none
    (the weights cannot tell a non-square grid's shape)."""
    side = math.isqrt(patches)
    if side * side != patches:
        from ..errors import CheckpointError

        raise CheckpointError(
            f"{patches} patch positions do not form a square grid: pass config= (or "
            "image_size=(h, w)) for a non-square checkpoint."
        )
    return side


@dataclasses.dataclass(frozen=True)
class Alias:
    """One published checkpoint, by a short name (``"resnet50"``)."""

    config: Any
    repo: str | None = None
    revision: str | None = None
    filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    local: Callable[[], Path] | None = None
    """Returns the path of a copy installed with a package (used instead of the hub)."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    """Short name, e.g. ``"clip_vision"``, ``"resnet"``, ``"efficientnet_lite"``."""
    config_cls: type
    """A frozen dataclass whose fields mirror the transformers config's."""
    build: Callable[[Any, Any], Any]
    """``build(config, key) -> backbone``: random init (run under ``eqx.filter_eval_shape``
    by the loader, so it never allocates)."""
    layouts: tuple[Layout, ...]
    """Every layout it reads; the first is the default for ``save_pretrained``."""
    infer_config: Callable[[Shapes], Any]
    """Config from the canonical shapes alone (for a bare weights file)."""
    feature_dim: Callable[[Any], int]
    """Size of the pooled features for a config (what a head takes)."""
    preprocessing: Callable[[Any], Preprocessing]
    """The default eval preprocessing for a config (when the checkpoint states none)."""
    blocks: str
    """Regex (full match, relative to the backbone) of the repeated blocks' module paths,
    in forward order: ``last_blocks``, layer-wise decay and remat use it."""
    norm_types: tuple[type, ...] = ()
    """The normalisation layer classes the backbone uses (type rules, weight decay)."""
    linear_types: tuple[type, ...] = ()
    """The linear / convolution layer classes (type rules, adapters)."""
    aliases: Mapping[str, Alias] = dataclasses.field(default_factory=dict)
    reconcile: Callable[[Any, Shapes], Any] = lambda config, shapes: config
    """Adjust a config read from a file to what the checkpoint holds (canonical shapes),
    e.g. whether CLIP's optional visual projection is present."""
    choices: tuple[str, ...] = ()
    """Config fields that are the user's choice, not the checkpoint's (e.g. DINOv2's
    ``pooling``): ``from_pretrained(..., field=value)`` may differ from a config file."""
    resize: Callable[[Any, Mapping[str, Any], Any], tuple[Any, dict]] | None = None
    """``resize(config, canonical tensors, image_size) -> (config, replaced tensors)``: the
    same weights for another input size, position embeddings resampled (``None``: the
    architecture has a fixed input size, or needs none)."""
    towers: str = "vision"
    """What the model is: ``"vision"``, an image backbone (``model(x, state) -> (features,
    state)``, what ``from_pretrained`` loads by default); ``"both"``, an image-text model
    (``from_pretrained(..., towers="both")``)."""
    supports_remat: bool = False
    """Whether ``eqxtl.with_remat`` applies (a module of the model has a static ``remat``
    flag, its blocks then run under ``eqx.filter_checkpoint``)."""
    supports_scan: bool = False
    """Whether ``eqxtl.with_scan`` applies (a module has a static ``scan`` flag)."""
    keyed_layers: str | None = None
    """Regex (full match, relative to the backbone) of the module paths the forward pass
    calls with a key when it gets one (so that adapters there can drop out); ``None``:
    none is."""
    adapter_prefix: str = ""
    """A prefix of the adapter-file keys (``adapter_key``) that some classes of the same
    model leave out: transformers 5.25's ``CLIPVisionModel`` / ``SiglipVisionModel`` name
    ``encoder.layers.0...`` what ``CLIPVisionModelWithProjection`` and ``CLIPModel`` name
    ``vision_model.encoder.layers.0...``. Adapter files are read in either naming and
    written in both."""

    @property
    def lora_types(self) -> tuple[type, ...]:
        """The layer types of ``linear_types`` that ``eqxtl.lora`` adapts."""
        from .layers.low_rank import ADAPTERS

        return tuple(t for t in self.linear_types if t in ADAPTERS)

    # ---- the questions the rest of eqxtl asks, answered from the layouts

    def plan(self, keys) -> tuple[Layout, Plan] | None:
        """The layout whose signature occurs in ``keys`` and whose map explains the most of
        them, with its plan; None when no layout's signature occurs."""
        keys = list(keys)
        found = [
            (lay, lay.keys.plan(keys))
            for lay in self.layouts
            if all(any(re.fullmatch(sig, k) for k in keys) for sig in lay.signature)
        ]
        if not found:
            return None
        return min(found, key=lambda f: (len(f[1].unexplained), -len(f[1].recipes)))

    def detect(self, shapes: Shapes) -> bool:
        """Whether a checkpoint's keys (any layout, training-wrapper prefixes allowed) are
        this architecture's."""
        return self.plan(strip_wrappers(list(shapes))) is not None

    def canonical_name(self, key: str) -> str | None:
        """One checkpoint key (any layout) -> its canonical name; ``None`` for keys that are
        known and not loaded; unknown keys map to themselves. (A packed key maps to its
        first part.)"""
        stripped = next(iter(strip_wrappers([key])))
        for lay in self.layouts:
            plan = lay.keys.plan([stripped])
            if plan.dropped:
                return None
            if plan.recipes:
                return min(plan.recipes)
        return key

    def key_in(self, canonical: str, layout: str | None = None, with_head: bool = False) -> str:
        """The key a canonical name is saved under in ``layout`` (default: the first, e.g.
        transformers); ``with_head``: in a file that also holds a classification head."""
        lay = self.layouts[0] if layout is None else self.layout(layout)
        hit = lay.keys.theirs(canonical, with_head)
        if hit is None:
            raise KeyError(f"{lay.name} layout of {self.name} has no name for {canonical!r}")
        return hit[0]

    def adapter_key(self, canonical: str, with_head: bool = False) -> str | None:
        """The key of a canonical name in the layout whose names adapter files (PEFT) use:
        transformers where the architecture has it, else its default layout; ``None`` when
        that layout has no name for it."""
        layout = "transformers" if any(lay.name == "transformers" for lay in self.layouts) else None
        try:
            return self.key_in(canonical, layout, with_head)
        except KeyError:
            return None

    def hf_name(self, canonical: str, with_head: bool = False) -> str:
        """The key of a canonical name in the default layout (transformers where it has one;
        see ``key_in``)."""
        return self.key_in(canonical, None, with_head)

    def config_from_hf(self, hf: Mapping[str, Any]) -> Any:
        """Config from a transformers-style ``config.json`` dict (not reconciled with any
        weights)."""
        from ..errors import CheckpointError

        config = self.layouts[0].read_config({"config.json": hf}, {})
        if config is None:
            raise CheckpointError(
                f"Not a {self.name} config.json: model_type {hf.get('model_type')!r}."
            )
        return config

    def config_to_hf(self, config: Any, num_labels: int | None = None) -> dict:
        """The ``config.json`` dict the default layout writes for ``config``."""
        extra = {"num_labels": num_labels, "preprocessing": self.preprocessing(config)}
        return self.layouts[0].write_config(config, extra)["config.json"]

    def layout(self, name: str) -> Layout:
        for layout in self.layouts:
            if layout.name == name:
                return layout
        from ..errors import CheckpointError

        raise CheckpointError(
            f"{self.name} has no layout {name!r}; it reads and writes "
            f"{[lay.name for lay in self.layouts]}."
        )
