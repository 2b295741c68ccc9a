"""Hugging Face PEFT adapter folders: ``save_adapter`` and ``load_adapter``
(``adapter_config.json`` + ``adapter_model.safetensors``, with the module names of the
transformers model of the same base)."""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ..._util.pytree_paths import closest, keypath_to_str, leaves_with_paths
from ...errors import AdapterError, CheckpointError, RuleError
from ...io.json_files import read_object
from ...models.heads import Classifier
from ...models.layers import LoRAConv2d
from ...models.layers.low_rank import (
    adaptable,
    adapted_layers,
)
from ...models.layers.quantized import is_quantized
from ...models.registry import architecture_of
from .inject import (
    adapter,
    all_layers,
    check_alpha,
    check_dropout,
    check_flag,
    check_rank,
    leaf,
    replace_layers,
    require_adapters,
)

_PEFT_PREFIX = "base_model.model."
_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"


def _peft_key(model: Any, path: str) -> str | None:
    """An eqxtl leaf path -> its key in the base model's layout that PEFT files name
    (``Architecture.adapter_key``: the transformers one); ``None`` when that layout has no
    name for it. PEFT's module names are these keys without the parameter name."""
    if isinstance(model, Classifier):
        backbone, with_head = model.backbone, True
        canonical = path.removeprefix("backbone.")
    else:
        backbone, with_head, canonical = model, False, path
    return architecture_of(backbone).adapter_key(canonical, with_head)


def _peft_module(model: Any, module: str) -> str | None:
    """The PEFT module name of a layer; ``None`` where the base model has no module of its
    own for it (e.g. a query projection packed into ``nn.MultiheadAttention``'s
    ``in_proj_weight``)."""
    key = _peft_key(model, leaf(module, "weight"))
    return None if key is None or not key.endswith(".weight") else key.removesuffix(".weight")


def _optional_prefix(model: Any) -> str:
    """``Architecture.adapter_prefix`` of the model's backbone (``"vision_model."`` for
    CLIP and SigLIP vision towers: transformers 5.25's vision-only classes leave it out)."""
    backbone = model.backbone if isinstance(model, Classifier) else model
    return architecture_of(backbone).adapter_prefix


def _namings(name: str, prefix: str) -> list[str]:
    """Every name a key has in the transformers 5.x classes of one model."""
    return [name, name[len(prefix) :]] if prefix and name.startswith(prefix) else [name]


def _target_modules(names: Sequence[str], prefix: str) -> list[str] | str:
    """PEFT's ``target_modules``: the module names, or where ``prefix`` is optional a regex
    (PEFT full-matches a string) that names exactly these modules in every naming; a list
    of names without the prefix would also match other towers' layers (``text_model.``)."""
    if not prefix or not any(n.startswith(prefix) for n in names):
        return sorted(names)
    parts = [
        f"(?:{re.escape(prefix)})?{re.escape(n[len(prefix) :])}"
        if n.startswith(prefix)
        else re.escape(n)
        for n in sorted(names)
    ]
    return "|".join(parts)


# --------------------------------------------------------------------------- save


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

    if os.path.lexists(directory) and not Path(directory).is_dir():
        raise FileExistsError(
            f"save_adapter: directory {str(directory)!r} is an existing file, not a folder; "
            "saving would destroy it. Pass a folder path (new or existing)."
        )
    if isinstance(modules_to_save, str):
        raise AdapterError(
            f"save_adapter: modules_to_save is a list of module paths; got the string "
            f"{modules_to_save!r} (write [{modules_to_save!r}])."
        )
    adapted = require_adapters(model, "save an adapter of")
    _check_uniform(adapted)
    unnamed = [p for p, _ in adapted if _peft_module(model, p) is None]
    if unnamed:
        raise AdapterError(
            f"save_adapter: the base model that PEFT files name (Architecture.adapter_key) "
            f"has no module for {unnamed[:3]}; PEFT files can only hold adapters of layers "
            "that are modules of the base model (not packed into another's weight). "
            "Leave them out of lora's targets."
        )
    prefix = _optional_prefix(model)
    tensors, ranks, alphas = {}, {}, {}
    for path, layer in adapted:
        name = _peft_module(model, path)
        for naming in _namings(name, prefix):  # weights under every naming: PEFT loads one
            tensors.update(_adapter_tensors(_PEFT_PREFIX + naming, layer))
        ranks[name], alphas[name] = layer.rank, layer.alpha
    saved = _modules_to_save(model, modules_to_save, tensors, prefix)
    config = _peft_config(adapted[0][1], ranks, alphas, saved, prefix)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / _WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / _CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory


def _check_uniform(adapted: list[tuple[str, Any]]) -> None:
    """PEFT files have one dropout, one rsLoRA flag and one kind (LoRA or DoRA)."""
    for flag in ("rslora", "dropout"):
        if len({getattr(layer, flag) for _, layer in adapted}) > 1:
            raise AdapterError(f"PEFT needs one {flag} setting for all adapters; they differ.")
    if len({layer.lora_magnitude is None for _, layer in adapted}) > 1:
        raise AdapterError("PEFT needs all adapters LoRA or all DoRA; they are mixed.")


def _adapter_tensors(prefix: str, layer: Any) -> dict[str, np.ndarray]:
    """One adapted layer's PEFT tensors under the module key ``prefix``."""
    out = {
        f"{prefix}.lora_A.weight": np.asarray(layer.lora_a),
        f"{prefix}.lora_B.weight": np.asarray(layer.lora_b),
    }
    if layer.lora_magnitude is not None:
        m = np.asarray(layer.lora_magnitude)
        out[f"{prefix}.lora_magnitude_vector"] = (
            m.reshape(1, -1, 1, 1) if isinstance(layer, LoRAConv2d) else m
        )
    return out


def _modules_to_save(model: Any, modules: Sequence[str], tensors: dict, prefix: str) -> list[str]:
    """Adds the leaves under each of ``modules`` to ``tensors``; returns their PEFT module
    names."""
    saved = []
    # a weight stored quantized is written dequantized under its float name, as
    # save_pretrained writes it: PEFT (and load_adapter) read plain float weights
    flat = jtu.tree_flatten_with_path(model, is_leaf=is_quantized)[0]
    leaves = {
        keypath_to_str(kp): node.dequantize() if is_quantized(node) else node
        for kp, node in flat
        if is_quantized(node) or eqx.is_array(node)
    }
    for module in modules:
        under = [p for p in leaves if p == module or p.startswith(module + ".")]
        if not under:
            hint = closest(module, leaves)
            raise RuleError(f"modules_to_save: no module {module!r} in the model. Closest: {hint}.")
        for p in under:
            key = _peft_key(model, p)
            if key is None:
                raise AdapterError(f"modules_to_save: no checkpoint name for {p!r}.")
            for naming in _namings(key, prefix):
                tensors[_PEFT_PREFIX + naming] = np.asarray(leaves[p])
            # PEFT matches modules_to_save by the end of the name: the shortest naming
            saved.append(_namings(key, prefix)[-1].rsplit(".", 1)[0])
    return saved


def _peft_config(
    first: Any, ranks: dict, alphas: dict, saved: list[str], prefix: str
) -> dict[str, Any]:
    """``adapter_config.json``: the most common rank and alpha, the others as patterns
    (PEFT matches a pattern at the end of a name: written without the optional prefix)."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    short = {n: _namings(n, prefix)[-1] for n in ranks}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": _target_modules(list(ranks), prefix),
        "rank_pattern": {re.escape(short[n]): k for n, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(short[n]): a for n, a in alphas.items() if a != alpha},
        "modules_to_save": sorted(set(saved)) or None,
        "use_rslora": first.rslora,
        "use_dora": first.lora_magnitude is not None,
        "lora_dropout": first.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }


# --------------------------------------------------------------------------- load


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
_SUFFIXES = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",
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
    done = adapted_layers(model)
    if done:
        raise AdapterError(
            f"load_adapter: {type(model).__name__} already has adapters ({done[0][0]}, ...). "
            "Load into the plain model, or merge_lora first."
        )
    directory = Path(directory)
    config, tensors = _read_peft(directory)
    adapters, others, mismatches = _split_keys(tensors)
    new = _adapter_arrays(model, adapters, config, mismatches)
    replaced = _replaced_leaves(model, others, mismatches)
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
    check_dropout(model, list(new), dropout)
    rslora = bool(config.get("use_rslora", False))
    adapted = {
        path: adapter(layer, a, b, m, alpha=alpha, rslora=rslora, dropout=dropout)
        for path, (layer, a, b, m, alpha) in new.items()
    }
    model = replace_layers(model, adapted)
    if not replaced:
        return model
    return jtu.tree_map_with_path(
        lambda kp, x: (
            jnp.asarray(replaced[keypath_to_str(kp)], x.dtype)
            if keypath_to_str(kp) in replaced
            else x
        ),
        model,
    )


def _read_peft(directory: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(adapter_config.json, tensors)`` of a PEFT LoRA folder, its options checked."""
    from safetensors.numpy import load_file

    files = [directory / _CONFIG_FILE, directory / _WEIGHTS_FILE]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"Not a PEFT adapter folder: missing {missing} (peft's save_pretrained writes "
            f"{_CONFIG_FILE} and {_WEIGHTS_FILE})."
        )
    config = read_object(
        files[0],
        "PEFT's adapter config",
        "Save the adapter again (peft's save_pretrained or eqxtl.save_adapter).",
    )
    _check_numbers(config, files[0])
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{files[0]}: peft_type {config.get('peft_type')!r}, not 'LORA'.")
    for field, value in _UNSUPPORTED.items():
        if config.get(field, value) not in (value, [], {}):
            raise CheckpointError(
                f"{files[0]}: {field}={config[field]!r} is not supported (only {value!r})."
            )
    return config, load_file(str(files[1]))


def _check_numbers(config: dict, file: Path) -> None:
    """The file's ranks, alphas, dropout and flags, checked as ``lora`` checks its own."""
    try:
        check_rank(config.get("r", 8), "r")
        check_alpha(config.get("lora_alpha", 8), "lora_alpha")
        for field, check in (("rank_pattern", check_rank), ("alpha_pattern", check_alpha)):
            patterns = config.get(field) or {}
            if not isinstance(patterns, dict):
                raise AdapterError(f"{field} must be a JSON object, got {patterns!r}.")
            for name, value in patterns.items():
                check(value, f"{field}[{name!r}]")
        for flag in ("use_dora", "use_rslora"):
            check_flag(config.get(flag, False), flag)
        dropout = config.get("lora_dropout", 0.0)
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool):
            raise AdapterError(f"lora_dropout must be a number in [0, 1), got {dropout!r}.")
    except AdapterError as e:
        raise CheckpointError(f"{file}: {e}") from None


def _split_keys(tensors: dict[str, np.ndarray]) -> tuple[dict, dict, list[str]]:
    """``({module: {"a"|"b"|"m": array}}, {other key: array}, mismatches)`` of a PEFT
    file's tensors (keys without the ``base_model.model.`` prefix)."""
    adapters: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    others, mismatches = {}, []
    for key, value in tensors.items():
        if not key.startswith(_PEFT_PREFIX):
            mismatches.append(f"{key}: not a PEFT key (no {_PEFT_PREFIX!r} prefix)")
            continue
        name = key[len(_PEFT_PREFIX) :]
        for suffix, part in _SUFFIXES.items():
            if name.endswith(suffix):
                adapters[name[: -len(suffix)]][part] = value
                break
        else:
            others[name] = value
    return adapters, others, mismatches


def _adapter_arrays(model: Any, adapters: dict, config: dict, mismatches: list[str]) -> dict:
    """``{module path: (layer, A, B, magnitude, alpha)}`` for each adapter of the file that
    fits a layer of ``model``; what does not fit goes to ``mismatches``."""
    prefix = _optional_prefix(model)
    modules = {}
    for p, layer in all_layers(model):
        name = _peft_module(model, p)
        for naming in _namings(name, prefix) if name is not None else ():
            modules[naming] = (p, layer)
    use_dora = bool(config.get("use_dora", False))
    new: dict[str, Any] = {}
    raw: dict[str, dict] = {}  # module path -> the file's arrays for it
    for name, parts in sorted(adapters.items()):
        if name not in modules:
            hint = closest(name, modules)
            mismatches.append(f"{name}: no such linear/conv layer (closest: {hint})")
            continue
        path, layer = modules[name]
        if path in raw:  # the same layer in another naming: must be the same adapter
            if not _same(raw[path], parts):
                mismatches.append(f"{name} ({path}): its namings in the file differ")
            continue
        raw[path] = parts
        if not adaptable(layer):
            mismatches.append(f"{name} ({path}): a {type(layer).__name__} LoRA cannot adapt")
            continue
        absent = [p for p in ("a", "b") + (("m",) if use_dora else ()) if p not in parts]
        if absent:
            mismatches.append(f"{name}: missing {absent} (lora_A/lora_B/lora_magnitude_vector)")
            continue
        r = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8))
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
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        new[path] = (layer, jnp.asarray(parts["a"]), jnp.asarray(parts["b"]), magnitude, alpha)
    return new


def _same(first: dict, parts: dict) -> bool:
    return first.keys() == parts.keys() and all(np.array_equal(first[k], parts[k]) for k in first)


def _replaced_leaves(model: Any, others: dict, mismatches: list[str]) -> dict[str, np.ndarray]:
    """``{leaf path: array}`` of the file's ``modules_to_save`` weights that fit ``model``;
    what does not fit goes to ``mismatches``."""
    prefix = _optional_prefix(model)
    leaves = {}
    for p, x in leaves_with_paths(model):
        key = _peft_key(model, p)
        for naming in _namings(key, prefix) if key is not None else ():
            leaves[naming] = (p, x)
    replaced = {}
    for name, value in sorted(others.items()):
        if name not in leaves and any(k.startswith(name + ".") for k in leaves):
            mismatches.append(
                f"{name}: stored quantized in this model (eqxtl.quantize): load the adapter "
                "into the float model, then quantize"
            )
        elif name not in leaves:
            mismatches.append(f"{name}: no such parameter (closest: {closest(name, leaves)})")
        elif tuple(value.shape) != tuple(leaves[name][1].shape):
            mismatches.append(f"{name}: shape {value.shape} != {tuple(leaves[name][1].shape)}")
        elif leaves[name][0] in replaced and not np.array_equal(replaced[leaves[name][0]], value):
            mismatches.append(f"{name}: two namings in the file hold different values")
        else:
            replaced[leaves[name][0]] = value
    return replaced
