"""``from_pretrained`` and ``save_pretrained``: the public way in and out of checkpoints.

Loading: resolve the source to local files (``hub``), read the tensors lazily, pick the
architecture and layout (a config file beside the weights first, then the keys), map the
keys to canonical names with the layout's key map, settle the config, fill a shape-only
skeleton by name (``checkpoint.fill``). Saving runs the same key map backwards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import numpy as np

from ..errors import AdapterError, CheckpointError, LayoutError
from ..models._arch import HEAD_NAMES, Architecture, Layout, unclaimed_config
from ..models._layout import RENAME, Lazy, Plan, Recipe, strip_wrappers, top_prefixes
from ..models.heads import Classifier
from ..models.layers import has_adapters, replace_static
from ..models.registry import ARCHITECTURES, architecture_of, lookup_alias, preprocessing_for
from . import checkpoint, hub, labels
from .json_files import read_object


class _SafetensorsFile(Mapping):
    """Read-on-demand view of a .safetensors file: shapes without loading, one tensor at a
    time, so that peak memory stays near one copy of the weights."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="numpy")
        self._keys = dict.fromkeys(self._file.keys())

    def __getitem__(self, key: str) -> np.ndarray:
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())


def _read(path: Path, torch_limits=None) -> Mapping[str, np.ndarray]:
    if path.suffix == ".safetensors":
        try:
            return _SafetensorsFile(path)
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None
    if path.suffix == ".npz":
        return _read_npz(path)
    from .torch_pickle import load_torch_file

    return load_torch_file(path, limits=torch_limits)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """A NumPy ``.npz`` (big_vision / vit_jax checkpoints), never unpickling anything."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as e:
        if "allow_pickle" in str(e):  # object arrays need pickle
            raise CheckpointError(
                f"{path} holds pickled (object) arrays, which eqxtl refuses to load: {e}"
            ) from None
        raise CheckpointError(
            f"{path} is truncated or corrupt: a member ends early or does not parse ({e}). "
            "Download or write it again."
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable .npz file: {e}") from None


def _read_meta(configs: Mapping[str, Path]) -> dict[str, dict]:
    """``{file name: JSON object}`` of the config files beside the weights."""
    meta = {}
    for name, path in configs.items():
        fix = "Fix or remove it, or pass config= to from_pretrained."
        data = read_object(path, "a model config", fix)
        meta[name] = data
    return meta


def _resolve(source, revision, cache_dir) -> tuple[hub.Resolved, Architecture | None, Any]:
    """-> (files, architecture of an alias or None, alias config or None)."""
    key = str(source)
    if not hub.looks_local(source) or key in _aliases():
        if key in _aliases():
            arch, entry = lookup_alias(key)
            if entry.local is not None:
                return hub.resolve_local(entry.local()), arch, entry.config
            files = hub.resolve_hub(
                entry.repo,
                revision=revision or entry.revision,
                filenames=entry.filenames,
                cache_dir=cache_dir,
            )
            return files, arch, entry.config
        return hub.resolve_hub(key, revision=revision, cache_dir=cache_dir), None, None
    path = Path(key).expanduser()
    if not path.exists() and not key.startswith((".", "/", "~")) and os.sep not in key:
        lookup_alias(key)  # a bare name that is neither a file nor an alias
    return hub.resolve_local(source), None, None


def _aliases() -> set[str]:
    from ..models.registry import REGISTRY

    return set(REGISTRY)


def _all_layouts() -> list[tuple[Architecture, Layout]]:
    return [(a, lay) for a in ARCHITECTURES.values() for lay in a.layouts]


def _describe_layouts() -> str:
    return "; ".join(
        f"{a.name}: {', '.join(lay.name for lay in a.layouts)}" for a in ARCHITECTURES.values()
    )


def _matches_signature(layout: Layout, keys: list[str]) -> bool:
    return all(any(re.fullmatch(sig, k) for k in keys) for sig in layout.signature)


def _candidates(
    towers: str, architecture: str | None, layout: str | None, alias_arch: Architecture | None
) -> list[tuple[Architecture, Layout]]:
    """The (architecture, layout) pairs a checkpoint may be read as, given the arguments."""
    candidates = [(a, lay) for a, lay in _all_layouts() if a.towers == towers]
    if architecture is not None:
        if architecture not in ARCHITECTURES:
            raise CheckpointError(
                f"Unknown architecture {architecture!r}; eqxtl reads {sorted(ARCHITECTURES)}."
            )
        if ARCHITECTURES[architecture].towers != towers:
            raise CheckpointError(
                f"Architecture {architecture!r} is read with "
                f"towers={ARCHITECTURES[architecture].towers!r}, not towers={towers!r}."
            )
        candidates = [(a, lay) for a, lay in candidates if a.name == architecture]
    elif alias_arch is not None:
        candidates = [(a, lay) for a, lay in candidates if a is alias_arch]
    if layout is not None:
        candidates = [(a, lay) for a, lay in candidates if lay.name == layout]
        if not candidates:
            raise CheckpointError(
                f"No layout {layout!r}{' for ' + architecture if architecture else ''}; "
                f"eqxtl reads {_describe_layouts()}."
            )
    return candidates


def _choose(
    meta: Mapping[str, Mapping],
    keys: list[str],
    candidates: list[tuple[Architecture, Layout]],
    layout: str | None,
    source: str,
) -> tuple[Architecture, Layout, Plan]:
    """The architecture and layout of a checkpoint: a config file beside the weights that
    claims one, else the layouts whose signature keys occur; the one whose key map explains
    the most keys wins."""
    claimed = [(a, lay) for a, lay in candidates if lay.claims(meta)]
    said = unclaimed_config(meta)
    if not claimed and layout is None and said is not None:
        raise CheckpointError(
            f"{source}: {said}, which eqxtl does not build. eqxtl reads "
            f"{_describe_layouts()}. Pass architecture= and layout= to force one."
        )
    pool = claimed or [(a, lay) for a, lay in candidates if _matches_signature(lay, keys)]
    if not pool:
        raise LayoutError(
            f"{source}: unknown checkpoint layout (top-level key prefixes: "
            f"{top_prefixes(keys)}; {len(keys)} keys). eqxtl reads {_describe_layouts()}. "
            "Pass architecture= (and layout=) to read it as one of these, config= for its "
            "shape, and ignore=[regex, ...] for keys to leave out."
        )
    plans = [(a, lay, lay.keys.plan(keys)) for a, lay in pool]
    arch, lay, plan = min(plans, key=lambda p: (len(p[2].unexplained), -len(p[2].recipes)))
    if claimed and len(plan.recipes) < len(keys) // 2:
        _check_claim(arch, lay, plan, keys, candidates, source)
    return arch, lay, plan


def _check_claim(arch, lay, plan, keys, candidates, source: str) -> None:
    """A config file's claim that explains few keys: an error when another layout's
    signature occurs (the config file is probably wrong)."""
    by_keys = [
        (a, ly, ly.keys.plan(keys))
        for a, ly in candidates
        if _matches_signature(ly, keys) and (a, ly) != (arch, lay)
    ]
    if by_keys:
        other = max(by_keys, key=lambda p: len(p[2].recipes))
        raise CheckpointError(
            f"{source}: its config file says {arch.name} ({lay.name} layout), but the "
            f"weights look like {other[0].name} in the {other[1].name} layout "
            f"({len(other[2].recipes)} of {len(keys)} keys fit it, {len(plan.recipes)} "
            "fit the config's). Remove the wrong config file or pass architecture= / "
            "config= to say which is right."
        )


def _ignore_filter(ignore: Iterable[str]) -> list[re.Pattern]:
    out = []
    for pattern in ignore:
        try:
            out.append(re.compile(f"(?:{pattern})(?:\\..*)?"))
        except re.error as e:
            raise CheckpointError(
                f"ignore= pattern {pattern!r} is not a valid regular expression ({e})."
            ) from None
    return out


def _apply_overrides(config, overrides: Mapping[str, Any], stated, source: str, free=()):
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise CheckpointError(
            f"{type(config).__name__} has no field {unknown}; its fields are {sorted(fields)}."
        )
    if stated is not None:
        clash = {
            k: (getattr(stated, k), v)
            for k, v in overrides.items()
            if getattr(stated, k) != v and k != "image_size" and k not in free
        }
        if clash:
            said = ", ".join(f"{k}={c!r} (argument {a!r})" for k, (c, a) in clash.items())
            raise CheckpointError(
                f"{source}: the config beside the weights says {said}. Remove the argument, "
                "or pass a whole config= if the file is wrong."
            )
    try:
        return dataclasses.replace(config, **overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid config override {dict(overrides)}: {e}") from None


def from_pretrained(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    config: Any = None,
    architecture: str | None = None,
    layout: str | None = None,
    ignore: Iterable[str] = (),
    keep_head: bool | None = None,
    dtype=None,
    cache_dir: str | os.PathLike | None = None,
    torch_limits=None,
    towers: str = "vision",
    quantize: str | None = None,
    **overrides: Any,
) -> tuple[eqx.Module, eqx.nn.State]:
    """Load a pretrained backbone by name, in inference mode.

    **Arguments:**

    - `source`: a registry alias (``"clip-vit-base-patch32"``, ``"resnet50"``,
      ``"efficientnet-lite0"``; see ``eqxtl.REGISTRY``), a Hugging Face repo id
      (``"microsoft/resnet-50"``, ``"timm/resnet50.a1_in1k"``,
      ``"laion/CLIP-ViT-B-32-laion2B-s34B-b79K"``), a local directory (weights + the config
      files beside them), or a single ``.safetensors`` / ``.pth`` / ``.bin`` file. PyTorch
      files are read without torch and without running any code they contain.
    - `revision`: hub branch, tag or commit.
    - `config`: the whole config (a ``CLIPVisionConfig``, ``ResNetConfig``...), instead of
      the one read from the files or inferred from the shapes.
    - `architecture`, `layout`: force one of ``eqxtl.ARCHITECTURES`` and one of its layouts
      (``"transformers"``, ``"timm"``, ``"open_clip"``, ``"torchvision"``...) instead of
      detecting them.
    - `ignore`: regexes (full match on the checkpoint key or the canonical name, or a
      module prefix of either) of checkpoint keys to leave out.
    - `keep_head`: return ``Classifier(backbone, head=<pretrained head>)`` so that the
      checkpoint's own predictions (e.g. ImageNet classes) can be checked. Default: only
      for a folder that ``save_pretrained`` wrote from a ``Classifier``, which comes back
      whole (head, class names, training preprocessing).
    - `dtype`: cast floating weights (default: as stored); weights that ``quantize`` stores
      are quantized from the stored values, not from their cast.
    - `quantize`: ``"int8"`` stores the weight of every linear and ungrouped convolution
      layer of the backbone as int8 with one float32 scale per output channel (an
      ``Int8Weight``; see ``eqxtl.quantize``), converting each as it is read: the float
      backbone is never whole in memory. The result is ``eqxtl.quantize(backbone, False,
      "int8")``'s: a frozen base for LoRA (``eqxtl.lora`` adapts it; a spec that trains one
      of its int8 weights is an error). ``"nf4"`` stores the weight of every linear layer
      as QLoRA's 4-bit NormalFloat (``NF4Weight``), the same way. ``eqxtl.quantize(model,
      spec)`` instead chooses by spec after loading.
    - `torch_limits`: an ``eqxtl.TorchLimits`` for PyTorch files (bounds on pickle objects,
      tensor expansion and zip members; the defaults admit real checkpoints up to 10 GB).
    - `**overrides`: config fields the weights cannot tell, e.g. ``hidden_act="quick_gelu"``
      for an open_clip file without its ``open_clip_config.json``. One that contradicts a
      config file beside the weights is an error.
    - `towers`: ``"vision"`` (default): the image backbone; ``"both"``: an image-text
      model, i.e. the architectures whose ``Architecture.towers`` is ``"both"``: CLIP's two
      towers as one ``eqxtl.CLIP`` (from a transformers ``CLIPModel`` or a full open_clip
      checkpoint; ``config`` is then a ``CLIPConfig``).

    **Returns:** ``(model, state)``: ``model(x, state) -> (features, state)`` for one image
    ``x`` of shape ``(C, H, W)``; ``state`` holds BatchNorm statistics (empty otherwise).

    Strict: any missing, unexpected or misshaped key raises one ``CheckpointError`` that
    lists them, with the layout the checkpoint was read as.
    """
    _check_towers(towers)
    files, alias_arch, alias_config = _resolve(source, revision, cache_dir)
    if alias_arch is not None and alias_arch.towers != towers:  # e.g. a vision alias, both
        alias_arch, alias_config = None, None
    source_name = files.description
    meta = _read_meta(files.configs)
    raw = _read(files.weights, torch_limits)
    renamed = strip_wrappers(list(raw))
    tensors = Lazy(raw, {k: Recipe(orig, RENAME, 0) for k, orig in renamed.items()})
    candidates = _candidates(towers, architecture, layout, alias_arch)
    arch, lay, plan = _choose(meta, list(tensors), candidates, layout, source_name)
    lay.check(tensors)
    if lay.classifier_keys is not None and lay.has_classifier(meta, tensors):
        plan = lay.classifier_keys.plan(list(tensors))
    elif (variant := lay.variant(tensors)) is not None:
        plan = variant.plan(list(tensors))
    canonical, unexplained = _canonical(tensors, plan, ignore)
    backbone_shapes = {k: v for k, v in canonical.shapes().items() if k not in HEAD_NAMES}
    size = overrides.pop("image_size", None)
    stated = None
    if config is None:
        config, stated = _settle_config(
            arch, lay, meta, backbone_shapes, alias_config, overrides, source_name
        )
    if overrides:
        config = _apply_overrides(config, overrides, stated, source_name, arch.choices)
    if size is not None and size != _image_size(config):
        if arch.resize is None:
            raise CheckpointError(
                f"{arch.name} has a fixed input size: image_size={size!r} cannot be changed."
            )
        dataclasses.replace(config, image_size=size)  # the config checks it (sizes, patches)
        config, resampled = arch.resize(config, canonical, size)
        canonical = canonical.replace(resampled)

    where = f"{source_name} (read as {arch.name}, {lay.name} layout)"
    backbone, state = checkpoint.fill(
        checkpoint.skeleton(arch, config),
        canonical.restrict(n for n in canonical if n not in HEAD_NAMES),
        source=where,
        dtype=dtype,
        quantize=quantize,
        unexplained=unexplained,
        hint=f"eqxtl reads {_describe_layouts()}; pass layout= / architecture= to choose.",
    )
    stated_preprocessing = lay.preprocessing(meta)
    if stated_preprocessing is not None:
        backbone = replace_static(
            backbone, preprocessing=stated_preprocessing.at_size(_image_size(config))
        )
    if keep_head is None:
        keep_head = labels.written_by_eqxtl(meta.get("config.json"))
    if not keep_head:
        return backbone, state
    if (why := lay.foreign_head(meta)) is not None:
        raise CheckpointError(
            f"keep_head=True: {source_name}'s classification head cannot be used here: {why}, "
            "so its logits would be wrong. Load the backbone (keep_head=False) and train a "
            "new head (eqxtl.Classifier)."
        )
    return _with_head(backbone, state, canonical, meta, where, source_name, dtype)


def _check_towers(towers: str) -> None:
    known = sorted({a.towers for a in ARCHITECTURES.values()})
    if towers not in known:
        raise ValueError(f"towers must be one of {known}, got {towers!r}.")


def _canonical(tensors: Lazy, plan: Plan, ignore: Iterable[str]) -> tuple[Lazy, list[str]]:
    """The checkpoint's tensors by canonical name (read on demand), without the keys that
    ``ignore`` matches; and the keys no rule of the layout explains (``ignore`` aside)."""
    patterns = _ignore_filter(ignore)
    keep = {
        name: r
        for name, r in plan.recipes.items()
        if not any(p.fullmatch(name) or p.fullmatch(r.key) for p in patterns)
    }
    unexplained = [k for k in plan.unexplained if not any(p.fullmatch(k) for p in patterns)]
    return Lazy(tensors, keep), unexplained


def _settle_config(arch, lay, meta, shapes, alias_config, overrides, source: str):
    """``(config, stated)``: the alias's config, else the one the files beside the weights
    state (``stated``), else the one inferred from the shapes with the layout's defaults for
    what the weights cannot tell (each with a warning, unless ``overrides`` sets it)."""
    if alias_config is not None:
        return arch.reconcile(alias_config, shapes), None
    try:
        stated = lay.read_config(meta, shapes)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        if isinstance(e, CheckpointError):
            raise
        kind = (
            " (a field holds another JSON type than expected, e.g. a list or number where an "
            "object belongs)"
            if isinstance(e, AttributeError)
            else ""
        )
        raise CheckpointError(
            f"{source}: the config beside the weights has an invalid field{kind}: {e!r}. Fix "
            "the file or pass config=."
        ) from None
    if stated is not None:
        return arch.reconcile(stated, shapes), stated
    config = arch.infer_config(shapes)
    for field, value in lay.defaults.items():
        if field in overrides:
            continue
        config = dataclasses.replace(config, **{field: value})
        hint = lay.default_hints.get(field)
        warnings.warn(
            f"{source}: {field} is not stored in the weights and no config file states it; "
            f"using the {lay.name} layout's default {value!r}. Pass {field}=... to "
            "from_pretrained to choose" + (f" (e.g. {hint})." if hint else "."),
            stacklevel=4,
        )
    return config, None


def _with_head(backbone, state, canonical: Lazy, meta, where: str, source: str, dtype):
    """``Classifier(backbone, head=<the checkpoint's head>)``, with what an eqxtl-written
    folder says about it (class names, training preprocessing, zero-shot flags)."""
    head_names = [n for n in canonical if n in HEAD_NAMES]
    if not head_names:
        raise CheckpointError(
            f"keep_head=True but {source} has no classification head (no classifier / fc weights)."
        )
    head_tensors = canonical.restrict(head_names)
    weight_shape = head_tensors.shapes()["head.weight"]
    head_skeleton = eqx.filter_eval_shape(
        eqx.nn.Linear,
        weight_shape[1],
        weight_shape[0],
        use_bias="head.bias" in head_names,
        key=_key0(),
    )
    head, _ = checkpoint.fill(
        head_skeleton,
        {n[len("head.") :]: head_tensors[n] for n in head_names},
        source=where,
        dtype=dtype,
    )
    flags = next((m[_HEAD_FLAGS] for m in meta.values() if _HEAD_FLAGS in m), {})
    written = [m for m in meta.values() if labels.written_by_eqxtl(m)]
    if written:  # class names, training preprocessing
        flags = {**flags, **labels.training_info(written[0], source)}
    try:  # flags: e.g. a zero-shot head's
        return Classifier(backbone, head=head, **flags), state
    except ValueError as e:  # a head that does not fit the backbone as built
        raise CheckpointError(f"{source}: {e}") from None


_HEAD_FLAGS = "eqxtl_classifier"  # config entry for Classifier(project=, normalize=)


def _image_size(config) -> int | None:
    return getattr(config, "image_size", None)


def _key0():
    import jax

    return jax.random.key(0)


def save_pretrained(
    model: eqx.Module,
    state: eqx.nn.State | None,
    path: str | os.PathLike,
    *,
    layout: str | None = None,
) -> Path:
    """Write ``model`` (a backbone or ``Classifier``) as weights + config files in one of
    its architecture's layouts, atomically per folder: the new files are written into a
    temporary sibling folder, fsynced and swapped in, so a crash at any point leaves the
    previous folder or the new one, never a mix. Other files already in ``path`` are kept,
    except weight and config files of other layouts, which would shadow the new ones.

    ``layout``: ``"transformers"`` (the default for CLIP and ResNet: transformers'
    ``from_pretrained`` reads the folder), ``"timm"`` (a timm hub folder: ``config.json``
    with ``architecture`` and ``pretrained_cfg``), ``"open_clip"``
    (``open_clip_model.safetensors`` + ``open_clip_config.json``; a vision tower alone loads
    into open_clip's ``CLIP`` with only the text tower missing) or ``"torchvision"``.
    ``from_pretrained(path)`` reads any of them back bit-identically.
    """
    _check_folder_path(path, "save_pretrained")
    if has_adapters(model):
        raise AdapterError(
            "save_pretrained: this model holds LoRA/DoRA adapters, which no checkpoint layout "
            "has names for. Save eqxtl.merge_lora(model) (a plain model, same outputs), or "
            "the adapters alone with eqxtl.save_adapter(model, dir)."
        )
    with_head = isinstance(model, Classifier)
    backbone = model.backbone if with_head else model
    arch: Architecture = architecture_of(backbone)
    lay = arch.layouts[0] if layout is None else arch.layout(layout)
    tensors = _layout_tensors(model, state, arch, lay)
    extra = {
        "num_labels": model.num_classes if with_head else None,
        "preprocessing": preprocessing_for(backbone),
    }
    configs = lay.write_config(backbone.config, extra)
    if with_head:
        labels.add_training_info(model, configs, lay.name)
    if with_head and (model.project or model.normalize) and configs:
        first = next(iter(configs))
        flags = {"project": model.project, "normalize": model.normalize}
        configs[first] = {**configs[first], _HEAD_FLAGS: flags}
    _write_folder(Path(path), lay.weights_file, tensors, configs)
    return Path(path)


def _check_folder_path(path, what: str) -> None:
    """``path`` may be a folder or nothing yet; an existing file is the user's: an error."""
    if os.path.lexists(path) and not Path(path).is_dir():
        raise FileExistsError(
            f"{what}: path {str(path)!r} is an existing file, not a folder; {what} writes a "
            "folder there and would destroy the file. Pass a folder path (new or existing)."
        )


def _layout_tensors(model, state, arch: Architecture, lay: Layout) -> dict[str, np.ndarray]:
    """Every tensor of ``model`` (a backbone or Classifier) under its key in ``lay``."""
    with_head = isinstance(model, Classifier)
    backbone = model.backbone if with_head else model
    canonical = {
        name: np.asarray(value) for name, value in checkpoint.state_dict(backbone, state).items()
    }
    if with_head:
        for name, value in checkpoint.state_dict(model.head).items():
            canonical[f"head.{name}"] = np.asarray(value)
    try:
        if with_head and lay.classifier_keys is not None:
            try:  # e.g. a timm CLIP tower without projection: its head is timm's `head`
                return lay.classifier_keys.save(canonical, with_head)
            except KeyError:
                pass
        return lay.keys.save(canonical, with_head)
    except KeyError as e:
        raise CheckpointError(
            f"The {lay.name} layout of {arch.name} has no name for {e.args[0]!r}; save in "
            f"another layout ({[x.name for x in arch.layouts]})."
        ) from None
    except ValueError as e:  # a layout eqxtl reads but does not write
        raise CheckpointError(
            f"eqxtl does not write the {lay.name} layout of {arch.name} ({e}); save in "
            f"another layout ({[x.name for x in arch.layouts]})."
        ) from None


def _write_folder(path: Path, weights_file: str, tensors: dict, configs: dict[str, dict]):
    """Weights + config files into ``path``, atomically per folder (other files kept, weight
    and config files of other layouts dropped: they would shadow the new ones)."""
    from safetensors.numpy import save_file

    from .._util.atomic import atomic_directory

    replacing = {weights_file, *configs, *hub.weight_files(), *hub.config_files()}
    with atomic_directory(path, replacing=replacing) as tmp:
        save_file(tensors, os.path.join(tmp, weights_file), metadata={"format": "pt"})
        for name, content in configs.items():
            Path(tmp, name).write_text(json.dumps(content, indent=2, sort_keys=True))
