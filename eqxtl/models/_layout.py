"""Two-way key maps between a checkpoint layout and eqxtl's canonical names.

A layout (transformers, timm, open_clip, torchvision, ...) is a table of rules, read top to
bottom, first match wins:

- ``Map(theirs, ours, op)``: a module or tensor path in the checkpoint and its canonical
  path. ``{i}`` stands for an index; ``ours`` may shift it (``{i-1}``: torchvision counts
  ``layer1..4``, transformers ``stages.0..3``). A path also matches everything under it:
  ``Map("bn1", "embedder.embedder.normalization")`` maps ``bn1.running_mean`` too. ``op`` is
  the tensor surgery, applied on load and undone on save: ``SPLIT3`` (a packed q/k/v
  projection -> three), ``TRANSPOSE`` (open_clip's ``proj`` is ``(in, out)``), ``SQUEEZE``
  (timm's ``(1, 1, D)`` class token), ``CONV_HWIO`` and ``merged_heads`` (flax kernels in
  ``.npz`` files, big_vision / vit_jax).
- ``Drop(regex)``: keys that are known and not loaded (buffers such as
  ``num_batches_tracked``, another tower). On save, ``constants`` add them back where the
  other library expects them.

The same table loads and saves, so the two directions cannot drift apart; a test checks
``save(load(x)) == x`` for every layout.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

Shape = tuple[int, ...]
_PLACEHOLDER = re.compile(r"\{(\w+)([+-]\d+)?\}")


@dataclasses.dataclass(frozen=True)
class Op:
    """Tensor surgery between ``n_theirs`` checkpoint tensors and ``n_ours`` canonical ones."""

    name: str
    n_ours: int
    load: Callable[[np.ndarray], list[np.ndarray]]
    save: Callable[[list[np.ndarray]], np.ndarray]
    shapes: Callable[[Shape], list[Shape]]


RENAME = Op("rename", 1, lambda x: [x], lambda xs: xs[0], lambda s: [s])
TRANSPOSE = Op("transpose", 1, lambda x: [x.T], lambda xs: xs[0].T, lambda s: [s[::-1]])


def split(n: int) -> Op:
    """One tensor packing ``n`` equal row blocks (q/k/v, timm's k/v) <-> ``n`` tensors."""
    return Op(
        f"split{n}",
        n,
        lambda x: list(np.split(x, n, axis=0)),
        lambda xs: np.concatenate(xs, axis=0),
        lambda s: [(s[0] // n, *s[1:])] * n,
    )


SPLIT3 = split(3)


def squeeze(leading: int) -> Op:
    """Drop ``leading`` unit axes on load (timm's ``cls_token (1, 1, D)`` -> ``(D,)``,
    ``pos_embed (1, N, D)`` -> ``(N, D)``); add them back on save."""
    return Op(
        f"squeeze{leading}",
        1,
        lambda x: [x.reshape(x.shape[leading:])],
        lambda xs: xs[0].reshape((1,) * leading + xs[0].shape),
        lambda s: [s[leading:]],
    )


CONV_HWIO = Op(
    "conv_hwio",
    1,
    lambda x: [x.transpose(3, 2, 0, 1)],
    lambda xs: xs[0].transpose(2, 3, 1, 0),
    lambda s: [(s[3], s[2], s[0], s[1])],
)
"""A flax / JAX convolution kernel ``(kh, kw, in, out)`` <-> torch's ``(out, in, kh, kw)``."""


def _read_only(name: str):
    def save(xs):
        raise ValueError(f"{name}: a read-only layout rule (its inverse needs the head count).")

    return save


def merged_heads(kind: str) -> Op:
    """Flax ``MultiHeadDotProductAttention`` tensors -> torch ``Linear`` ones (read only: the
    inverse needs the head count, which the tensors do not carry):

    - ``"in"``: a query / key / value kernel ``(d, heads, hd)`` -> weight ``(heads*hd, d)``;
    - ``"bias"``: a query / key / value bias ``(heads, hd)`` -> ``(heads*hd,)``;
    - ``"out"``: the output kernel ``(heads, hd, d)`` -> weight ``(d, heads*hd)``.
    """
    if kind == "in":
        load, shapes = (
            lambda x: [x.reshape(x.shape[0], -1).T],
            lambda s: [(int(np.prod(s[1:])), s[0])],
        )
    elif kind == "bias":
        load, shapes = lambda x: [x.reshape(-1)], lambda s: [(int(np.prod(s)),)]
    elif kind == "out":
        load, shapes = (
            lambda x: [x.reshape(-1, x.shape[-1]).T],
            lambda s: [(s[-1], int(np.prod(s[:-1])))],
        )
    else:
        raise ValueError(f"merged_heads kind must be 'in', 'bias' or 'out', got {kind!r}.")
    return Op(f"merged_heads_{kind}", 1, load, _read_only(f"merged_heads({kind!r})"), shapes)


def _compile(pattern: str) -> tuple[re.Pattern, dict[str, int]]:
    """Regex for a pattern with ``{name}`` / ``{name+k}`` placeholders, and the offsets."""
    parts, offsets, pos = [], {}, 0
    for m in _PLACEHOLDER.finditer(pattern):
        parts.append(re.escape(pattern[pos : m.start()]))
        parts.append(rf"(?P<{m.group(1)}>\d+)")
        offsets[m.group(1)] = int(m.group(2) or 0)
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("".join(parts) + r"(?P<_rest>\..+)?"), offsets


def _fill(pattern: str, values: Mapping[str, int], sign: int) -> str:
    def sub(m):
        return str(values[m.group(1)] + sign * int(m.group(2) or 0))

    return _PLACEHOLDER.sub(sub, pattern)


@dataclasses.dataclass(frozen=True)
class Map:
    """``theirs`` (checkpoint path) <-> ``ours`` (canonical path, or several for ``SPLIT3``)."""

    theirs: str
    ours: str | tuple[str, ...]
    op: Op = RENAME
    save: bool | str = True
    """Whether ``save`` writes through this rule: ``True`` always, ``False`` never (a name
    only read), ``"head"`` / ``"backbone"`` only for files with / without a head (e.g.
    transformers' ``resnet.`` prefix of ``ResNetForImageClassification``)."""

    @property
    def ours_tuple(self) -> tuple[str, ...]:
        return self.ours if isinstance(self.ours, tuple) else (self.ours,)

    def __post_init__(self):
        if len(self.ours_tuple) != self.op.n_ours:
            raise ValueError(f"{self}: {self.op.name} needs {self.op.n_ours} canonical paths.")

    def match_theirs(self, key: str) -> list[str] | None:
        """Canonical names for a checkpoint key, or None."""
        regex, _ = _compile(self.theirs)
        m = regex.fullmatch(key)
        if m is None:
            return None
        values = {k: int(v) for k, v in m.groupdict().items() if k != "_rest"}
        rest = m.group("_rest") or ""
        if rest and self.op is not RENAME:
            return None
        _, offsets = _compile(self.ours_tuple[0])
        shifted = {k: v + offsets.get(k, 0) for k, v in values.items()}
        return [_strip_offsets(o).format(**shifted) + rest for o in self.ours_tuple]

    def match_ours(self, name: str) -> tuple[str, int] | None:
        """``(checkpoint key, index among ours)`` for a canonical name, or None."""
        for index, ours in enumerate(self.ours_tuple):
            regex, _ = _compile(ours)
            m = regex.fullmatch(name)
            if m is None:
                continue
            rest = m.group("_rest") or ""
            if rest and self.op is not RENAME:
                continue
            values = {k: int(v) for k, v in m.groupdict().items() if k != "_rest"}
            _, offsets = _compile(ours)
            unshifted = {k: v - offsets.get(k, 0) for k, v in values.items()}
            return _fill(self.theirs, unshifted, 1) + rest, index
        return None


def _strip_offsets(pattern: str) -> str:
    return _PLACEHOLDER.sub(lambda m: "{" + m.group(1) + "}", pattern)


def packed(theirs: str, ours: str, parts: str = "qkv") -> Map:
    """A packed q/k/v tensor (rows in ``parts`` order) <-> one canonical tensor per part:
    ``*`` in ``ours`` stands for each part, e.g. ``packed("blocks.{i}.attn.qkv.weight",
    "encoder.layers.{i}.self_attn.*_proj.weight")``; ``parts="kv"`` for packed k/v."""
    op = SPLIT3 if len(parts) == 3 else split(len(parts))
    return Map(theirs, tuple(ours.replace("*", p) for p in parts), op)


@dataclasses.dataclass(frozen=True)
class Drop:
    """Checkpoint keys (full-match regex) that are known and not loaded."""

    pattern: str


Rule = Map | Drop


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to produce one canonical tensor: ``op.load(source[key])[index]``."""

    key: str
    op: Op
    index: int

    def read(self, source: Mapping[str, np.ndarray]) -> np.ndarray:
        value = source[self.key]
        return value if self.op is RENAME else self.op.load(np.asarray(value))[self.index]

    def shape(self, theirs: Shape) -> Shape:
        return self.op.shapes(tuple(theirs))[self.index]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The result of reading a checkpoint's keys with one key map."""

    recipes: dict[str, Recipe]
    """Canonical name -> how to read it."""
    dropped: tuple[str, ...]
    """Keys known and not loaded."""
    unexplained: tuple[str, ...]
    """Keys no rule matched."""


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """An ordered table of ``Map`` / ``Drop`` rules, plus the constants a save adds."""

    rules: tuple[Rule, ...]
    constants: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] = lambda t: {}
    """``constants(saved tensors) -> extra tensors`` the other library expects on save
    (e.g. PyTorch BatchNorm's ``num_batches_tracked``)."""

    def plan(self, keys: Iterable[str]) -> Plan:
        recipes: dict[str, Recipe] = {}
        dropped, unexplained = [], []
        for key in keys:
            for rule in self.rules:
                if isinstance(rule, Drop):
                    if re.fullmatch(rule.pattern, key):
                        dropped.append(key)
                        break
                    continue
                names = rule.match_theirs(key)
                if names is not None:
                    for i, name in enumerate(names):
                        recipes[name] = Recipe(key, rule.op, i)
                    break
            else:
                unexplained.append(key)
        return Plan(recipes, tuple(dropped), tuple(unexplained))

    def theirs(self, name: str, with_head: bool = False) -> tuple[str, Map, int] | None:
        """``(checkpoint key, rule, index)`` a canonical name is saved under."""
        for rule in self.rules:
            if isinstance(rule, Map) and rule.save in (True, "head" if with_head else "backbone"):
                hit = rule.match_ours(name)
                if hit is not None:
                    return hit[0], rule, hit[1]
        return None

    def save(
        self, tensors: Mapping[str, np.ndarray], with_head: bool = False
    ) -> dict[str, np.ndarray]:
        """Canonical tensors -> this layout's keys (surgery undone, constants added).

        Raises ``KeyError`` naming a canonical tensor no rule can save."""
        grouped: dict[str, tuple[Map, dict[int, np.ndarray]]] = {}
        for name, value in tensors.items():
            hit = self.theirs(name, with_head)
            if hit is None:
                raise KeyError(name)
            key, rule, index = hit
            grouped.setdefault(key, (rule, {}))[1][index] = np.asarray(value)
        out = {}
        for key, (rule, parts) in grouped.items():
            if len(parts) != rule.op.n_ours:
                raise KeyError(f"{key}: needs all of {rule.ours_tuple}")
            # contiguous: safetensors writes a strided view's raw buffer, not its values
            out[key] = _contiguous(rule.op.save([parts[i] for i in range(rule.op.n_ours)]))
        out.update(self.constants(out))
        return out


def _contiguous(x: np.ndarray) -> np.ndarray:
    # not np.ascontiguousarray: it turns a 0-d array (CLIP's logit_scale) into shape (1,)
    x = np.asarray(x)
    return x if x.flags.c_contiguous else x.copy(order="C")


class Lazy(Mapping):
    """``canonical name -> tensor`` over a checkpoint mapping, read one tensor at a time (so
    peak memory stays near one copy of the weights); ``shapes()`` without reading."""

    def __init__(
        self,
        source: Mapping[str, np.ndarray],
        recipes: Mapping[str, Recipe],
        replaced: Mapping[str, np.ndarray] | None = None,
    ):
        self._source, self._recipes = source, dict(recipes)
        self._replaced = dict(replaced or {})

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._replaced:
            return self._replaced[name]
        return self._recipes[name].read(self._source)

    def __iter__(self) -> Iterator[str]:
        return iter(self._recipes)

    def __contains__(self, name) -> bool:
        return name in self._recipes

    def __len__(self) -> int:
        return len(self._recipes)

    def key_of(self, name: str) -> str:
        return self._recipes[name].key

    def shapes(self) -> dict[str, Shape]:
        src = self._source
        get = src.shape if hasattr(src, "shape") else lambda k: tuple(src[k].shape)
        shapes = {name: r.shape(get(r.key)) for name, r in self._recipes.items()}
        return shapes | {name: tuple(v.shape) for name, v in self._replaced.items()}

    def restrict(self, names: Iterable[str]) -> Lazy:
        names = list(names)
        return Lazy(self._source, {n: self._recipes[n] for n in names}, self._replaced)

    def replace(self, values: Mapping[str, np.ndarray]) -> Lazy:
        """The same view with some canonical tensors replaced by ``values``."""
        return Lazy(self._source, self._recipes, {**self._replaced, **values})

    def shape(self, name: str) -> Shape:
        return self.shapes()[name]


_WRAPPERS = re.compile(r"^(?:(?:module|model|state_dict|model_state_dict|backbone|net)\.)+")


def strip_wrappers(keys: Sequence[str]) -> dict[str, str]:
    """``{stripped key: original key}``: the prefixes that training wrappers add
    (``module.`` from DataParallel, ``model.``, ``state_dict.`` ...) removed when every key
    carries the same one."""
    if not keys:
        return {}
    prefixes = {(m.group(0) if (m := _WRAPPERS.match(k)) else "") for k in keys}
    if len(prefixes) == 1 and (prefix := prefixes.pop()):
        return {k[len(prefix) :]: k for k in keys}
    return {k: k for k in keys}


def top_prefixes(keys: Iterable[str], limit: int = 12) -> list[str]:
    """The distinct first path components of ``keys`` (for error messages)."""
    return sorted({k.split(".", 1)[0] for k in keys})[:limit]


# ---- flax modules in `.npz` files (big_vision, vit_jax): keys joined with "/"


def flax_dense(theirs: str, ours: str) -> tuple[Map, Map]:
    """A flax ``Dense`` (``{theirs}/kernel (in, out)``, ``{theirs}/bias``) <-> a torch
    ``Linear`` (``{ours}.weight (out, in)``, ``{ours}.bias``)."""
    return Map(f"{theirs}/kernel", f"{ours}.weight", TRANSPOSE), Map(
        f"{theirs}/bias", f"{ours}.bias"
    )


def flax_norm(theirs: str, ours: str) -> tuple[Map, Map]:
    """A flax ``LayerNorm`` (``scale``, ``bias``) <-> torch's (``weight``, ``bias``)."""
    return Map(f"{theirs}/scale", f"{ours}.weight"), Map(f"{theirs}/bias", f"{ours}.bias")


def flax_attention(theirs: str, ours: Mapping[str, str]) -> tuple[Map, ...]:
    """A flax ``MultiHeadDotProductAttention`` (per-head ``query``, ``key``, ``value``,
    ``out`` kernels and biases) <-> four torch ``Linear``s: ``ours`` maps each flax name to
    its canonical module path. Read only (see ``merged_heads``)."""
    rules = []
    for name, path in ours.items():
        kind = "out" if name == "out" else "in"
        rules.append(Map(f"{theirs}/{name}/kernel", f"{path}.weight", merged_heads(kind)))
        bias = RENAME if name == "out" else merged_heads("bias")
        rules.append(Map(f"{theirs}/{name}/bias", f"{path}.bias", bias))
    return tuple(rules)
