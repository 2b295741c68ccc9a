"""Parameter-efficient fine-tuning: LoRA and DoRA adapters as new leaves of the model.

``lora(model, targets, rank=8, key=...)`` wraps every matched linear layer and ungrouped
convolution in a ``LoRALinear`` / ``LoRAConv2d`` whose ``weight`` and ``bias`` keep their
paths, with ``lora_a``, ``lora_b`` (and DoRA's ``lora_magnitude``) beside them:
``backbone.encoder.layers.3.self_attn.q_proj.lora_a``. ``B`` starts at zero, so the
adapted model computes exactly what the plain one did. Then freezing is data as usual:
``lora_spec(model, "head")`` trains the adapters and the head, ``param_groups`` can give
``".*lora_.*"`` its own learning rate.

``merge_lora`` folds the adapters into the weights (a plain model, which ``save_pretrained``
writes); ``unmerge_lora(merged, adapted)`` takes them out again. ``save_adapter`` /
``load_adapter`` write and read Hugging Face PEFT's ``adapter_config.json`` +
``adapter_model.safetensors`` for the transformers model of the same base.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PRNGKeyArray

from .._util.pytree_paths import closest, keypath_to_str, leaves_with_paths
from ..errors import AdapterError, CheckpointError, RuleError
from ..models.heads import Classifier
from ..models.layers import Conv2d, LoRAConv2d, LoRALinear
from ..models.layers.low_rank import dora_scale
from ..models.registry import architecture_of
from .filters import Rule, _compile, _describe, trainable

_ADAPTED = (LoRALinear, LoRAConv2d)
_LAYERS = (eqx.nn.Linear, Conv2d, *_ADAPTED)
ADAPTER_RULE = r"(.*\.)?lora_(a|b|magnitude)"
"""The filter rule that matches every adapter leaf (``lora_a``, ``lora_b``,
``lora_magnitude``)."""

_PEFT_PREFIX = "base_model.model."
_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"


# --------------------------------------------------------------------------- finding layers


def _is_layer(x: Any) -> bool:
    return isinstance(x, _LAYERS)


def _layers(model: Any) -> list[tuple[str, Any]]:
    """``(module path, layer)`` for every linear/conv layer (plain or adapted) of ``model``."""
    flat = jtu.tree_flatten_with_path(model, is_leaf=_is_layer)[0]
    return [(keypath_to_str(kp), node) for kp, node in flat if _is_layer(node)]


def _adapted_layers(model: Any) -> list[tuple[str, Any]]:
    return [(p, layer) for p, layer in _layers(model) if isinstance(layer, _ADAPTED)]


def has_adapters(model: Any) -> bool:
    """Whether ``model`` holds LoRA/DoRA adapters (``eqxtl.lora`` / ``load_adapter``)."""
    return bool(_adapted_layers(model))


def _leaf(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def _adaptable(layer: Any) -> bool:
    if isinstance(layer, eqx.nn.Linear):
        return layer.weight.ndim == 2
    if isinstance(layer, Conv2d):
        return layer.groups == 1 and layer.dilation == (1, 1)
    return False


def _fan(layer: Any) -> tuple[int, int]:
    """``(fan_in, out)``: the shape of the matrix a layer applies (conv: ``in * kh * kw``)."""
    return math.prod(layer.weight.shape[1:]), layer.weight.shape[0]


def _replace(model: Any, new: dict[str, Any]) -> Any:
    """``model`` with the layers at the module paths in ``new`` replaced."""
    return jtu.tree_map_with_path(
        lambda kp, node: new.get(keypath_to_str(kp), node) if _is_layer(node) else node,
        model,
        is_leaf=_is_layer,
    )


def _select(model: Any, rules: list[Rule]) -> list[tuple[str, Any]]:
    """The plain layers matched by any rule (a rule matches a layer when it matches the
    layer's ``weight`` path, as a filter rule would). A rule that matches no linear or
    ungrouped convolution layer is a ``RuleError``."""
    layers = _layers(model)
    candidates = [p for p, layer in layers if _adaptable(layer)]
    chosen: dict[str, Any] = {}
    for rule in rules:
        pred = _compile(model, rule)
        hits = [(p, layer) for p, layer in layers if pred(_leaf(p, "weight"), layer.weight)]
        done = [p for p, layer in hits if isinstance(layer, _ADAPTED)]
        if done:
            raise AdapterError(
                f"Rule {_describe(rule)} matches layers that already have adapters: "
                f"{done[:5]}. Merge them first (eqxtl.merge_lora) or leave them out."
            )
        good = [(p, layer) for p, layer in hits if _adaptable(layer)]
        if not good:
            hint = _hint(rule, candidates) if isinstance(rule, str) else []
            near = f" Closest adaptable layers: {hint}." if hint else ""
            raise RuleError(
                f"Rule {_describe(rule)} matches no linear or (ungrouped) convolution layer "
                f"of {type(model).__name__}.{near} List them with eqxtl.adapter_targets(model)."
            )
        chosen.update(good)
    return [(p, layer) for p, layer in layers if p in chosen]


def _hint(rule: str, candidates: list[str]) -> list[str]:
    """Adaptable layers whose name looks like the rule's (``.*\\.q_prj`` -> ``q_proj``
    layers), else whose path does."""
    last = re.sub(r"[^\w.]", "", rule.replace("\\.", ".")).strip(".").rsplit(".", 1)[-1]
    by_name: dict[str, str] = {}
    for path in candidates:
        by_name.setdefault(path.rsplit(".", 1)[-1], path)
    names = difflib.get_close_matches(last, by_name, n=3, cutoff=0.5) if last else []
    return [by_name[n] for n in names] or closest(rule, candidates)


def adapter_targets(model: Any) -> list[str]:
    """Module paths of every layer ``lora`` can adapt (linear layers and ungrouped,
    undilated convolutions; depthwise convolutions are left as they are)."""
    return [p for p, layer in _layers(model) if _adaptable(layer)]


# --------------------------------------------------------------------------- building


def _adapter(layer, a, b, magnitude, *, alpha: float, rslora: bool, dropout: float):
    """The adapted version of a plain ``layer`` with the given adapter arrays."""
    common = dict(
        weight=layer.weight,
        bias=layer.bias,
        lora_a=a,
        lora_b=b,
        lora_magnitude=magnitude,
        alpha=float(alpha),
        rslora=bool(rslora),
        dropout=float(dropout),
    )
    if isinstance(layer, eqx.nn.Linear):
        return LoRALinear(
            **common,
            in_features=layer.in_features,
            out_features=layer.out_features,
            use_bias=layer.use_bias,
        )
    return LoRAConv2d(
        **common,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
    )


def _keyed(model: Any, path: str) -> bool:
    """Whether the layer at ``path`` is called with a key (so its adapter can drop out)."""
    backbone, prefix = model, ""
    if isinstance(model, Classifier):
        backbone, prefix = model.backbone, "backbone."
    pattern = getattr(backbone, "keyed_layers", None)
    return (
        bool(pattern)
        and path.startswith(prefix)
        and bool(re.fullmatch(pattern, path[len(prefix) :]))
    )


def _check_dropout(model: Any, paths: list[str], dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(f"dropout must be in [0, 1), got {dropout}.")
    unkeyed = [p for p in paths if not _keyed(model, p)]
    if dropout > 0 and unkeyed:
        raise AdapterError(
            f"dropout={dropout} cannot reach {len(unkeyed)} of the targeted layers (e.g. "
            f"{unkeyed[:3]}): only CLIP's encoder linears receive the training step's key. "
            "Use dropout=0.0 for these targets."
        )


def lora(
    model: Any,
    targets: Rule | Sequence[Rule],
    *,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    dora: bool = False,
    rslora: bool = False,
    key: PRNGKeyArray,
) -> Any:
    """``model`` with every linear/convolution layer matched by ``targets`` adapted.

    - `targets`: filter rules (one or a list; regex on paths, module types, predicates),
      matched against each layer's ``weight`` path: ``r".*\\.(q_proj|v_proj)"``,
      ``"head"``, ``eqx.nn.Linear``. Grouped (depthwise) convolutions are skipped.
    - `rank`: ``r``, ``1 <= r <= min(fan_in, out)`` of every matched layer.
    - `alpha`: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with `rslora`);
      default ``alpha = r``.
    - `dropout`: on the adapters' input during training (when the model is called with a
      key; only CLIP's encoder linears are).
    - `dora`: DoRA (weight-decomposed LoRA): a trainable magnitude per output channel.

    ``A`` is drawn like PEFT's (uniform, bound ``1 / sqrt(fan_in)``), ``B`` is zero: the
    adapted model's outputs equal the plain model's exactly.

    >>> model = eqxtl.lora(model, r".*\\.(q_proj|v_proj)", rank=8, key=jax.random.key(0))
    >>> spec = eqxtl.lora_spec(model, "head")
    """
    rules = list(targets) if isinstance(targets, (list, tuple)) else [targets]
    if not rules:
        raise RuleError("lora() needs at least one target rule.")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"rank must be a positive integer, got {rank!r}.")
    chosen = _select(model, rules)
    too_big = [(p, _fan(layer)) for p, layer in chosen if rank > min(_fan(layer))]
    if too_big:
        raise AdapterError(
            f"rank {rank} exceeds min(fan_in, out) of {len(too_big)} targeted layers, e.g. "
            f"{too_big[:3]} (path, (fan_in, out)): a rank-{rank} update of these is no "
            "low-rank update. Use a smaller rank or other targets."
        )
    _check_dropout(model, [p for p, _ in chosen], dropout)
    alpha = float(rank if alpha is None else alpha)
    # One draw for all A's, sliced in numpy: eager per-shape draws compile once per shape.
    sizes = [rank * _fan(layer)[0] for _, layer in chosen]
    flat = np.asarray(jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0))
    offsets = np.cumsum([0, *sizes])
    new = {}
    for (path, layer), start in zip(chosen, offsets, strict=False):
        fan_in, out = _fan(layer)
        w = layer.weight
        a = flat[start : start + rank * fan_in].reshape(rank, *w.shape[1:]) / math.sqrt(fan_in)
        b = np.zeros((out, rank, *(1,) * (w.ndim - 2)))
        magnitude = None
        if dora:
            w64 = np.asarray(w, np.float64).reshape(out, -1)
            magnitude = jnp.asarray(np.sqrt(np.sum(w64 * w64, axis=1)), w.dtype)
        a, b = jnp.asarray(a, w.dtype), jnp.asarray(b, w.dtype)
        new[path] = _adapter(layer, a, b, magnitude, alpha=alpha, rslora=rslora, dropout=dropout)
    return _replace(model, new)


def lora_spec(model: Any, *also: Rule) -> Any:
    """Filter spec in which the adapters train, plus whatever ``also`` matches.

    >>> spec = eqxtl.lora_spec(model, "head")   # adapters + the new head
    """
    _require_adapters(model, "build a LoRA spec for")
    return trainable(model, ADAPTER_RULE, *also)


def _require_adapters(model: Any, what: str) -> list[tuple[str, Any]]:
    layers = _adapted_layers(model)
    if not layers:
        raise AdapterError(
            f"Cannot {what} {type(model).__name__}: it has no LoRA/DoRA adapters (already "
            "merged, or never adapted? Add them with eqxtl.lora or eqxtl.load_adapter)."
        )
    return layers


# --------------------------------------------------------------------------- merge


def _plain(layer, weight, bias):
    """A plain ``eqx.nn.Linear`` / ``Conv2d`` with ``layer``'s configuration."""
    if isinstance(layer, LoRALinear):
        template = eqx.filter_eval_shape(
            eqx.nn.Linear,
            layer.in_features,
            layer.out_features,
            use_bias=layer.use_bias,
            key=jax.random.key(0),
        )
    else:
        out, cin, kernel, _ = layer.weight.shape
        template = eqx.filter_eval_shape(
            Conv2d,
            cin * layer.groups,
            out,
            kernel,
            stride=layer.stride[0],
            padding=layer.padding,
            dilation=layer.dilation[0],
            groups=layer.groups,
            use_bias=layer.bias is not None,
            key=jax.random.key(0),
        )
    if bias is None:
        return eqx.tree_at(lambda m: m.weight, template, weight)
    return eqx.tree_at(lambda m: (m.weight, m.bias), template, (weight, bias))


def _per_channel(g, weight):
    return g.reshape(-1, *(1,) * (weight.ndim - 1))


@eqx.filter_jit  # one compilation for all layers, not one per weight shape
def _merged_weights(layers: list) -> list:
    out = []
    for layer in layers:
        w = layer.weight.astype(jnp.float32) + layer.delta().astype(jnp.float32)
        if layer.lora_magnitude is not None:
            w = _per_channel(dora_scale(layer), w) * w
        out.append(w.astype(layer.weight.dtype))
    return out


@eqx.filter_jit
def _unmerged_weights(layers: list, merged: list) -> list:
    out = []
    for layer, w_merged in zip(layers, merged, strict=True):
        w = w_merged.astype(jnp.float32)
        if layer.lora_magnitude is not None:
            w = w / _per_channel(dora_scale(layer), w)
        out.append((w - layer.delta().astype(jnp.float32)).astype(w_merged.dtype))
    return out


def merge_lora(model: Any) -> Any:
    """The plain model with every adapter folded into its weights: ``W + s B A`` (DoRA:
    ``m * (W + s B A) / ||W + s B A||`` per output channel). Same outputs as the adapted
    model (up to float rounding); ``save_pretrained`` writes it like any plain model.

    Refuses a model without adapters (merging twice)."""
    layers = _require_adapters(model, "merge")
    weights = _merged_weights([layer for _, layer in layers])
    new = {p: _plain(layer, w, layer.bias) for (p, layer), w in zip(layers, weights, strict=True)}
    return _replace(model, new)


def unmerge_lora(merged: Any, adapted: Any) -> Any:
    """Take the adapters of ``adapted`` back out of ``merged`` (= ``merge_lora(adapted)``,
    possibly trained further): the adapted model again, with base weights
    ``W_merged - s B A`` (DoRA: ``W_merged * ||W + s B A|| / m - s B A``, the norm from
    ``adapted``) and every other leaf from ``merged``.

    A merged model holds no adapters (it is a plain model, the point of merging), so the
    adapters come from ``adapted``; the base weights it returns equal the original ones up
    to float rounding."""
    adapters = dict(_require_adapters(adapted, "take adapters from"))
    plain = dict(_layers(merged))
    still = [p for p, layer in plain.items() if isinstance(layer, _ADAPTED)]
    if still:
        raise AdapterError(
            f"unmerge_lora: the first argument still has adapters ({still[:3]}); pass the "
            "merged (plain) model first, then the adapted one."
        )
    wrong = [
        p
        for p, layer in adapters.items()
        if p not in plain or plain[p].weight.shape != layer.weight.shape
    ]
    if wrong:
        raise AdapterError(
            f"unmerge_lora: {len(wrong)} adapted layers have no plain layer of the same shape "
            f"in the merged model, e.g. {wrong[:3]}: it was not merged from this model."
        )
    weights = _unmerged_weights(list(adapters.values()), [plain[p].weight for p in adapters])
    new = {
        p: dataclasses.replace(layer, weight=w, bias=plain[p].bias)
        for (p, layer), w in zip(adapters.items(), weights, strict=True)
    }
    return _replace(merged, new)


# --------------------------------------------------------------------------- PEFT files


def _transformers_key(model: Any, path: str) -> str | None:
    """An eqxtl leaf path -> its key in the transformers layout of the same base model (the
    architecture's default layout when it has no transformers one); ``None`` when that
    layout has no name for it. The one place that knows the naming: PEFT's module names are
    these keys without the parameter name."""
    if isinstance(model, Classifier):
        backbone, with_head = model.backbone, True
        canonical = path.removeprefix("backbone.")
    else:
        backbone, with_head, canonical = model, False, path
    arch = architecture_of(backbone)
    names = [layout.name for layout in arch.layouts]
    try:
        return arch.key_in(
            canonical, "transformers" if "transformers" in names else None, with_head
        )
    except KeyError:
        return None


def _transformers_module(model: Any, module: str) -> str | None:
    key = _transformers_key(model, _leaf(module, "weight"))
    return None if key is None else key.removesuffix(".weight")


def save_adapter(
    model: Any, directory: str | os.PathLike, *, modules_to_save: Sequence[str] = ()
) -> Path:
    """Write the adapters of ``model`` as a PEFT adapter: ``adapter_config.json`` +
    ``adapter_model.safetensors``. ``peft.PeftModel.from_pretrained(<transformers model of
    the same base>, directory)`` then computes what ``model`` computes.

    - `modules_to_save`: eqxtl module paths trained in full (e.g. ``["head"]``), saved
      whole as PEFT's ``modules_to_save``.
    """
    from safetensors.numpy import save_file

    layers = _require_adapters(model, "save an adapter of")
    for flag in ("rslora", "dropout"):
        if len({getattr(layer, flag) for _, layer in layers}) > 1:
            raise AdapterError(f"PEFT needs one {flag} setting for all adapters; they differ.")
    if len({layer.lora_magnitude is None for _, layer in layers}) > 1:
        raise AdapterError("PEFT needs all adapters LoRA or all DoRA; they are mixed.")
    tensors, ranks, alphas = {}, {}, {}
    unnamed = [p for p, _ in layers if _transformers_module(model, p) is None]
    if unnamed:
        raise AdapterError(
            f"save_adapter: the transformers layout has no name for {unnamed[:3]}; PEFT "
            "files can only hold adapters of layers the transformers model has."
        )
    for path, layer in layers:
        name = _transformers_module(model, path)
        prefix = _PEFT_PREFIX + name
        tensors[f"{prefix}.lora_A.weight"] = np.asarray(layer.lora_a)
        tensors[f"{prefix}.lora_B.weight"] = np.asarray(layer.lora_b)
        if layer.lora_magnitude is not None:
            m = np.asarray(layer.lora_magnitude)
            tensors[f"{prefix}.lora_magnitude_vector"] = (
                m.reshape(1, -1, 1, 1) if isinstance(layer, LoRAConv2d) else m
            )
        ranks[name], alphas[name] = layer.rank, layer.alpha
    saved = []
    leaves = dict(leaves_with_paths(model))
    for module in modules_to_save:
        under = [p for p in leaves if p == module or p.startswith(module + ".")]
        if not under:
            hint = closest(module, leaves)
            raise RuleError(f"modules_to_save: no module {module!r} in the model. Closest: {hint}.")
        for p in under:
            key = _transformers_key(model, p)
            if key is None:
                raise AdapterError(f"modules_to_save: no transformers name for {p!r}.")
            tensors[_PEFT_PREFIX + key] = np.asarray(leaves[p])
            saved.append(key.rsplit(".", 1)[0])
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    first = layers[0][1]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(n): k for n, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != alpha},
        "modules_to_save": sorted(set(saved)) or None,
        "use_rslora": first.rslora,
        "use_dora": first.lora_magnitude is not None,
        "lora_dropout": first.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / _WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / _CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first pattern that matches
    the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{pattern})$", name):
            return value
    return default


_UNSUPPORTED = {
    "bias": "none",
    "fan_in_fan_out": False,
    "lora_bias": False,
    "layers_to_transform": None,
    "layer_replication": None,
    "target_parameters": None,
}


def load_adapter(model: Any, directory: str | os.PathLike, *, dropout: float | None = None) -> Any:
    """``model`` (plain) with the PEFT LoRA/DoRA adapter in ``directory`` applied: the one
    ``peft`` saved for the transformers model of the same base. Reads ``r``,
    ``lora_alpha``, ``rank_pattern``/``alpha_pattern``, ``use_rslora``, ``use_dora`` and
    ``modules_to_save`` (their weights replace the model's); the adapted layers are the
    ones the file holds weights for.

    - `dropout`: the adapters' dropout for further training (default: the file's
      ``lora_dropout``).

    An adapter for another base (unknown module names, shapes that differ) is a
    ``CheckpointError`` listing every mismatch.
    """
    from safetensors.numpy import load_file

    done = _adapted_layers(model)
    if done:
        raise AdapterError(
            f"load_adapter: {type(model).__name__} already has adapters ({done[0][0]}, ...). "
            "Load into the plain model, or merge_lora first."
        )
    directory = Path(directory)
    files = [directory / _CONFIG_FILE, directory / _WEIGHTS_FILE]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"Not a PEFT adapter folder: missing {missing} (peft's save_pretrained writes "
            f"{_CONFIG_FILE} and {_WEIGHTS_FILE})."
        )
    config = json.loads(files[0].read_text())
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{files[0]}: peft_type {config.get('peft_type')!r}, not 'LORA'.")
    for field, value in _UNSUPPORTED.items():
        if config.get(field, value) not in (value, [], {}):
            raise CheckpointError(
                f"{files[0]}: {field}={config[field]!r} is not supported (only {value!r})."
            )
    tensors = load_file(str(files[1]))

    modules = {_transformers_module(model, p): (p, layer) for p, layer in _layers(model)}
    leaves = {_transformers_key(model, p): (p, leaf) for p, leaf in leaves_with_paths(model)}
    modules.pop(None, None)
    leaves.pop(None, None)
    adapters: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    others, mismatches = {}, []
    suffixes = {
        ".lora_A.weight": "a",
        ".lora_B.weight": "b",
        ".lora_magnitude_vector": "m",
        ".lora_magnitude_vector.weight": "m",
    }
    for key, value in tensors.items():
        if not key.startswith(_PEFT_PREFIX):
            mismatches.append(f"{key}: not a PEFT key (no {_PEFT_PREFIX!r} prefix)")
            continue
        name = key[len(_PEFT_PREFIX) :]
        for suffix, part in suffixes.items():
            if name.endswith(suffix):
                adapters[name[: -len(suffix)]][part] = value
                break
        else:
            others[name] = value

    use_dora = bool(config.get("use_dora", False))
    r_default = config.get("r", 8)
    alpha_default = config.get("lora_alpha", 8)
    new: dict[str, Any] = {}
    for name, parts in sorted(adapters.items()):
        if name not in modules:
            hint = closest(name, modules)
            mismatches.append(f"{name}: no such linear/conv layer (closest: {hint})")
            continue
        path, layer = modules[name]
        if not _adaptable(layer):
            mismatches.append(f"{name} ({path}): a {type(layer).__name__} LoRA cannot adapt")
            continue
        absent = [p for p in ("a", "b") + (("m",) if use_dora else ()) if p not in parts]
        if absent:
            mismatches.append(f"{name}: missing {absent} (lora_A/lora_B/lora_magnitude_vector)")
            continue
        a, b = parts["a"], parts["b"]
        r = _pattern_value(config.get("rank_pattern") or {}, name, r_default)
        w = layer.weight.shape
        want = {"a": (r, *w[1:]), "b": (w[0], r, *(1,) * (len(w) - 2))}
        if use_dora:
            want["m"] = (1, w[0], 1, 1) if len(w) == 4 else (w[0],)
        bad = [
            f"{part} {parts[part].shape} != {shape}"
            for part, shape in want.items()
            if tuple(parts[part].shape) != shape
        ]
        if bad:
            mismatches.append(f"{name} ({path}, weight {w}): " + "; ".join(bad))
            continue
        magnitude = jnp.asarray(parts["m"]).reshape(w[0]) if use_dora else None
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, alpha_default)
        new[path] = (layer, jnp.asarray(a), jnp.asarray(b), magnitude, alpha)
    replaced = {}
    for name, value in others.items():
        if name not in leaves:
            mismatches.append(f"{name}: no such parameter (closest: {closest(name, leaves)})")
        elif tuple(value.shape) != tuple(leaves[name][1].shape):
            mismatches.append(f"{name}: shape {value.shape} != {tuple(leaves[name][1].shape)}")
        else:
            replaced[leaves[name][0]] = value
    if not adapters:
        mismatches.append("no lora_A/lora_B weights in the file")
    if mismatches:
        listed = "\n  ".join(mismatches[:20])
        more = f"\n  ... and {len(mismatches) - 20} more" if len(mismatches) > 20 else ""
        raise CheckpointError(
            f"The adapter in {directory} does not fit this {type(model).__name__} "
            f"({len(mismatches)} mismatches; was it trained on another base model?):\n  "
            f"{listed}{more}"
        )
    dropout = float(config.get("lora_dropout", 0.0)) if dropout is None else dropout
    _check_dropout(model, list(new), dropout)
    rslora = bool(config.get("use_rslora", False))
    adapted = {
        path: _adapter(layer, a, b, m, alpha=alpha, rslora=rslora, dropout=dropout)
        for path, (layer, a, b, m, alpha) in new.items()
    }
    model = _replace(model, adapted)
    if replaced:
        model = jtu.tree_map_with_path(
            lambda kp, leaf: (
                jnp.asarray(replaced[keypath_to_str(kp)], leaf.dtype)
                if keypath_to_str(kp) in replaced
                else leaf
            ),
            model,
        )
    return model
