"""Read PyTorch checkpoints (``.pth`` / ``.pt`` / ``.bin``) without torch and without running
any code they contain.

A torch checkpoint is a pickle, and unpickling can call any function the file names
(``os.system`` included). This reader unpickles with a ``find_class`` that knows a short
whitelist of globals (torch's tensor-rebuild functions, storage classes and dtypes,
``collections.OrderedDict``) and maps each to an inert pure-numpy stand-in; any other global
raises ``UnsafeCheckpointError`` before anything is called.

Both layouts torch writes are read:

- zip (``torch.save`` since torch 1.6): ``<prefix>/data.pkl`` holds the object,
  ``<prefix>/data/<key>`` the raw bytes of each storage, ``<prefix>/byteorder`` their order.
- legacy (``_use_new_zipfile_serialization=False`` and torch < 1.6): one stream of pickles,
  ``magic number, protocol version, sys_info, object, storage keys``, then each storage as an
  int64 element count followed by its raw bytes.

Tensors are rebuilt lazily: the pickle yields placeholders, and only the tensors that are
returned are read from disk, each storage once.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from ..errors import TorchFileError, UnsafeCheckpointError

__all__ = ["TorchFileError", "TorchLimits", "UnsafeCheckpointError", "load_torch_file"]


@dataclasses.dataclass(frozen=True)
class TorchLimits:
    """Bounds that keep a hostile or corrupt file from taking unbounded time or memory.

    The defaults admit every real checkpoint up to 10 GB and more (a state dict of a
    million tensors, a pickle of a gigabyte, tied weights); a file past a bound is a
    ``TorchFileError`` that names the bound. Pass others to ``load_torch_file(limits=)``.

    **Fields:**

    - `max_objects`: container items walked when collecting the tensors (the
      "billion laughs" pickle, a list of ten references to a list of ten references...,
      stops here, after well under a second).
    - `max_pickle_bytes`: size of the pickle (``data.pkl``) itself.
    - `max_expansion`, `expansion_allowance`: the tensors together may take at most
      ``max_expansion * (bytes of the storages they view) + expansion_allowance`` bytes
      (strides of 0 can make a tiny storage describe a huge tensor; shared storages are
      counted once per tensor built from them).
    - `check_crc`: verify the zip's CRC-32 of every storage read (torch writes it).
    """

    max_objects: int = 1_000_000
    max_pickle_bytes: int = 1 << 30
    max_expansion: float = 4.0
    expansion_allowance: int = 1 << 26
    check_crc: bool = True


DEFAULT_LIMITS = TorchLimits()

# A zip member may hold this many bytes beyond the storage the pickle declares for it (torch
# writes exactly the storage; anything much longer is an inflation bomb or corruption).
_MEMBER_SLACK = 4096


_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_PROTOCOL_VERSION = 1001  # torch.serialization.PROTOCOL_VERSION

# Legacy storage classes, as torch._utils / torch.storage name them. Each stands for a dtype.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    # Bytes; paired with a torch dtype by _rebuild_tensor_v3 (uint16, float8, ...).
    "UntypedStorage": np.dtype(np.uint8),
}

# torch.<dtype> globals. They appear in _rebuild_tensor_v3 and as plain values.
_TORCH_DTYPES: dict[str, np.dtype] = {
    **{n: np.dtype(np.float32) for n in ("float32", "float")},
    **{n: np.dtype(np.float64) for n in ("float64", "double")},
    **{n: np.dtype(np.float16) for n in ("float16", "half")},
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    **{n: np.dtype(np.int64) for n in ("int64", "long")},
    **{n: np.dtype(np.int32) for n in ("int32", "int")},
    **{n: np.dtype(np.int16) for n in ("int16", "short")},
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    **{n: np.dtype(np.complex64) for n in ("complex64", "cfloat")},
    **{n: np.dtype(np.complex128) for n in ("complex128", "cdouble")},
    **{
        n: np.dtype(getattr(ml_dtypes, n))
        for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    },
}

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


# --------------------------------------------------------------------------- inert stand-ins


class _Inert:
    """Base of every object the unpickler can create: immutable, uncallable, and refusing
    the pickle ``BUILD`` opcode (which would otherwise overwrite validated fields)."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise TorchFileError(f"{type(self).__name__} is read-only")

    def __setstate__(self, state):
        raise TorchFileError("malformed checkpoint: BUILD on a tensor placeholder")

    def _set(self, **fields):
        for k, v in fields.items():
            object.__setattr__(self, k, v)


class _StorageType(_Inert):
    """Stand-in for ``torch.FloatStorage`` and friends: a dtype marker."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self._set(name=name, dtype=dtype)

    def __repr__(self):
        return f"torch.{self.name}"


class _DType(_Inert):
    """Stand-in for ``torch.float32`` and friends."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self._set(name=name, dtype=dtype)

    def __repr__(self):
        return f"torch.{self.name}"


class _Storage(_Inert):
    """A storage named by the pickle: ``numel`` elements of ``dtype``, bytes read later.

    Views (legacy files only) share the root's bytes from ``start`` (in elements)."""

    __slots__ = ("key", "dtype", "numel", "root", "start")

    def __init__(self, key: str, dtype: np.dtype, numel: int, root=None, start: int = 0):
        self._set(key=key, dtype=dtype, numel=numel, root=root, start=start)


class _LazyTensor(_Inert):
    """``torch._utils._rebuild_tensor_v2``'s arguments, checked; materialised later."""

    __slots__ = ("storage", "offset", "shape", "stride", "dtype")

    def __init__(self, storage, offset, shape, stride, dtype: np.dtype):
        self._set(storage=storage, offset=offset, shape=shape, stride=stride, dtype=dtype)


def _ints(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x
    ):
        raise TorchFileError(f"malformed tensor record: {what} {x!r}")
    return tuple(x)


def _tensor(storage, storage_offset, size, stride, dtype=None) -> _LazyTensor:
    if not isinstance(storage, _Storage):
        raise TorchFileError(f"malformed tensor record: storage {type(storage).__name__}")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise TorchFileError(f"malformed tensor record: storage offset {storage_offset!r}")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise TorchFileError(f"malformed tensor record: size {shape} with stride {strides}")
    return _LazyTensor(storage, storage_offset, shape, strides, dtype or storage.dtype)


def _empty_hooks(hooks) -> None:
    if hooks:  # non-empty hooks would be functions, refused earlier; be explicit anyway
        raise UnsafeCheckpointError("tensor with backward hooks: refusing to load them")


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
):
    _empty_hooks(backward_hooks)
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    # torch >= 2.1 writes dtypes without a legacy storage class (uint16, float8...) as an
    # UntypedStorage (bytes) plus the dtype; the offset counts elements of that dtype.
    _empty_hooks(backward_hooks)
    if not isinstance(dtype, _DType):
        raise TorchFileError(f"malformed tensor record: dtype {dtype!r}")
    if isinstance(storage, _Storage) and storage.dtype.itemsize != 1:
        raise TorchFileError("malformed tensor record: typed storage in _rebuild_tensor_v3")
    return _tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    _empty_hooks(backward_hooks)
    if not isinstance(data, _LazyTensor):
        raise TorchFileError(f"malformed parameter record: {type(data).__name__}")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    if state:
        raise UnsafeCheckpointError("parameter with Python attributes: refusing to load them")
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    **{("torch", n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    **{("torch", n): _DType(n, d) for n, d in _TORCH_DTYPES.items()},
}


def _refusal(module: str, name: str, source: str) -> str:
    what = f"{module}.{name}"
    kind = (
        "a TorchScript archive (torch.jit.save)"
        if module.startswith("__torch__")
        else "something other than tensors in dicts/lists (a pickled function, class "
        "instance or whole nn.Module)"
    )
    return (
        f"Refusing to load {source}: it names the Python global '{what}', and eqxtl never "
        f"imports or calls what a checkpoint names. The file holds {kind}. If you trust it, "
        "load it with torch and re-save the weights as safetensors "
        "(safetensors.torch.save_file(model.state_dict(), 'model.safetensors')) or as a "
        "state dict of tensors (torch.save(model.state_dict(), 'model.pth'))."
    )


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals are the whitelist above; ``storage_record`` turns torch's
    persistent ids into ``_Storage`` placeholders (``None``: no storages allowed)."""

    def __init__(self, file, source: str, storage_record=None):
        super().__init__(file, encoding="utf-8")
        self._source = source
        self._storage_record = storage_record

    def find_class(self, module: str, name: str):
        try:
            return _GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(_refusal(str(module), str(name), self._source)) from None

    def persistent_load(self, pid):
        if self._storage_record is None:
            raise TorchFileError(f"unexpected persistent id {pid!r}")
        if not isinstance(pid, tuple) or not pid:
            raise TorchFileError(f"malformed persistent id {pid!r}")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename == "module":
            raise UnsafeCheckpointError(
                _refusal("torch.nn", "Module (pickled source)", self._source)
            )
        if typename != "storage":
            raise TorchFileError(f"unknown persistent id type {typename!r}")
        return self._storage_record(pid[1:])


# --------------------------------------------------------------------------- the two layouts


def _storage_type(x) -> np.dtype:
    if not isinstance(x, _StorageType):
        raise TorchFileError(f"malformed storage record: type {x!r}")
    return x.dtype


def _count(x, what: str) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < 0:
        raise TorchFileError(f"malformed storage record: {what} {x!r}")
    return x


class _ZipReader:
    def __init__(self, f, source: str, limits: TorchLimits):
        self.f, self.source, self.limits = f, source, limits
        try:
            self.zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise TorchFileError(f"{source}: corrupt zip archive ({e})") from None
        self.size = os.fstat(f.fileno()).st_size
        names = self.zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise TorchFileError(
                f"{source} is a zip archive without data.pkl: not a torch.save checkpoint."
            )
        self.prefix = pkl[0][: -len("data.pkl")]
        self.storages: dict[str, _Storage] = {}
        order = self.prefix + "byteorder"
        self.byteorder = "little"
        if order in names:
            if self.zf.getinfo(order).file_size > 16:
                raise TorchFileError(f"{source}: malformed byteorder entry")
            self.byteorder = self.zf.read(order).decode("ascii", "replace").strip()
            if self.byteorder not in ("little", "big"):
                raise TorchFileError(f"{source}: unknown byte order {self.byteorder!r}")

    def record(self, data: tuple) -> _Storage:
        if len(data) != 4:
            raise TorchFileError(f"malformed storage record {data!r}")
        storage_type, key, _location, numel = data
        dtype, numel, key = _storage_type(storage_type), _count(numel, "numel"), str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(key, dtype, numel)
        return self.storages[key]

    def load_object(self):
        info = self.zf.getinfo(self.prefix + "data.pkl")
        _check_pickle_size(info.file_size, self.source, self.limits)
        data = self.zf.read(info)  # bounded above; zipfile checks its CRC
        return _RestrictedUnpickler(io.BytesIO(data), self.source, self.record).load()

    def position(self, key: str) -> int:
        try:
            return self.zf.getinfo(f"{self.prefix}data/{key}").header_offset
        except KeyError:
            return -1  # reported by read()

    def read(self, storage: _Storage) -> memoryview:
        name = f"{self.prefix}data/{storage.key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise TorchFileError(f"{self.source}: storage {storage.key!r} is missing") from None
        nbytes = storage.numel * storage.dtype.itemsize
        if info.file_size < nbytes:
            raise TorchFileError(
                f"{self.source}: storage {storage.key!r} has {info.file_size} bytes, "
                f"{nbytes} expected"
            )
        if info.file_size > nbytes + _MEMBER_SLACK:
            raise TorchFileError(
                f"{self.source}: zip member {name} inflates to {info.file_size} bytes but "
                f"the tensors on it declare {nbytes}: refusing it (an inflation bomb, or a "
                "corrupt file)."
            )
        if info.compress_type != zipfile.ZIP_STORED:
            return memoryview(bytearray(self.zf.read(info)))[:nbytes]  # CRC checked
        # torch stores storages uncompressed: read them straight from the file into
        # their final buffer (no intermediate bytes object).
        self.f.seek(info.header_offset)
        header = self.f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise TorchFileError(f"{self.source}: corrupt zip entry {name}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if info.compress_size != info.file_size or start + info.file_size > self.size:
            raise TorchFileError(f"{self.source}: truncated storage {storage.key!r}")
        buf = bytearray(info.file_size)
        self.f.seek(start)
        if self.f.readinto(buf) != len(buf):
            raise TorchFileError(f"{self.source}: truncated storage {storage.key!r}")
        if self.limits.check_crc and zlib.crc32(buf) != info.CRC:
            raise TorchFileError(
                f"{self.source}: storage {storage.key!r} fails the zip's CRC-32 check "
                "(corrupt file; download it again)."
            )
        return memoryview(buf)[:nbytes]


def _check_pickle_size(nbytes: int, source: str, limits: TorchLimits) -> None:
    if nbytes > limits.max_pickle_bytes:
        raise TorchFileError(
            f"{source}: its pickle is {nbytes} bytes, over TorchLimits.max_pickle_bytes "
            f"({limits.max_pickle_bytes}); if you trust the file, pass a larger bound."
        )


class _LegacyReader:
    def __init__(self, f, source: str, limits: TorchLimits):
        self.f, self.source = f, source
        # One stream of pickles and raw storages: the file's size bounds the pickle.
        _check_pickle_size(os.fstat(f.fileno()).st_size, source, limits)
        self.storages: dict[str, _Storage] = {}
        self.byteorder = "little"
        magic = _RestrictedUnpickler(f, source).load()
        if magic != _MAGIC_NUMBER:
            raise TorchFileError(
                f"{source} is neither a zip archive nor a legacy torch pickle (no magic "
                "number): not a PyTorch checkpoint, or corrupt."
            )
        protocol = _RestrictedUnpickler(f, source).load()
        if protocol != _PROTOCOL_VERSION:
            raise TorchFileError(f"{source}: unsupported legacy protocol version {protocol!r}")
        sys_info = _RestrictedUnpickler(f, source).load()
        if isinstance(sys_info, Mapping) and sys_info.get("little_endian") is False:
            self.byteorder = "big"

    def record(self, data: tuple) -> _Storage:
        if len(data) != 5:
            raise TorchFileError(f"malformed storage record {data!r}")
        storage_type, root_key, _location, numel, view = data
        dtype, numel, root_key = _storage_type(storage_type), _count(numel, "numel"), str(root_key)
        if root_key not in self.storages:
            self.storages[root_key] = _Storage(root_key, dtype, numel)
        root = self.storages[root_key]
        if view is None:
            return root
        # Storage views: written by torch < 0.4 only.
        if not isinstance(view, tuple) or len(view) != 3:
            raise TorchFileError(f"malformed storage view {view!r}")
        view_key, start, size = str(view[0]), _count(view[1], "offset"), _count(view[2], "size")
        if start + size > root.numel:
            raise TorchFileError(f"{self.source}: storage view beyond its storage")
        return self.storages.setdefault(view_key, _Storage(view_key, dtype, size, root, start))

    def load_object(self):
        obj = _RestrictedUnpickler(self.f, self.source, self.record).load()
        keys = _RestrictedUnpickler(self.f, self.source).load()
        if not isinstance(keys, list):
            raise TorchFileError(f"{self.source}: malformed storage key list")
        self.offsets: dict[str, int] = {}
        pos = self.f.tell()
        for key in map(str, keys):
            storage = self.storages.get(key)
            if storage is None or storage.root is not None:
                raise TorchFileError(f"{self.source}: unknown storage {key!r}")
            self.offsets[key] = pos + 8
            pos += 8 + storage.numel * storage.dtype.itemsize
        if pos > os.fstat(self.f.fileno()).st_size:
            raise TorchFileError(f"{self.source}: truncated (storages end past the file)")
        return obj

    def position(self, key: str) -> int:
        return self.offsets.get(key, -1)

    def read(self, storage: _Storage) -> bytearray:
        if storage.key not in self.offsets:
            raise TorchFileError(f"{self.source}: storage {storage.key!r} has no data")
        start = self.offsets[storage.key]
        self.f.seek(start - 8)
        head = self.f.read(8)
        if len(head) != 8:
            raise TorchFileError(f"{self.source}: truncated at storage {storage.key!r}")
        (numel,) = struct.unpack("<q" if self.byteorder == "little" else ">q", head)
        if numel != storage.numel:
            raise TorchFileError(
                f"{self.source}: storage {storage.key!r} holds {numel} elements, "
                f"{storage.numel} expected (corrupt file)"
            )
        buf = bytearray(numel * storage.dtype.itemsize)
        if self.f.readinto(buf) != len(buf):
            raise TorchFileError(f"{self.source}: truncated at storage {storage.key!r}")
        return buf


# --------------------------------------------------------------------------- materialising


def _lazy_tensors(
    obj, prefix: str, out: dict[str, _LazyTensor], ancestors: set[int], budget: list[int]
) -> None:
    if isinstance(obj, _LazyTensor):
        if prefix in out:
            raise TorchFileError(f"two tensors flatten to the same key {prefix!r}")
        out[prefix] = obj
        return
    if isinstance(obj, dict):  # the only mappings an unpickler builds (OrderedDict included)
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return  # ints, strings, dtypes, bare storages...: not tensors
    if id(obj) in ancestors:  # a container inside itself
        raise TorchFileError("malformed checkpoint: a container contains itself")
    # Shared references make a small pickle describe an exponential tree: count every item
    # walked, before walking it.
    budget[0] -= len(obj)
    if budget[0] < 0:
        raise TorchFileError(
            f"the checkpoint's containers hold more than TorchLimits.max_objects "
            f"({budget[1]}) items (counting each shared reference again): refusing to walk "
            "it (a pickle bomb?). If you trust the file, pass a larger bound."
        )
    ancestors.add(id(obj))
    for k, v in items:
        if isinstance(v, (_LazyTensor, dict, list, tuple)):
            _lazy_tensors(v, f"{prefix}.{k}" if prefix else str(k), out, ancestors, budget)
    ancestors.discard(id(obj))


def _unwrap(obj):
    """The state dict inside a training checkpoint ``{"state_dict": {...}, "epoch": ...}``."""
    if not isinstance(obj, Mapping) or any(isinstance(v, _LazyTensor) for v in obj.values()):
        return obj
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _is_contiguous(shape, stride) -> bool:
    return all(n == 1 or s == c for n, s, c in zip(shape, stride, _c_strides(shape), strict=True))


def _root(t: _LazyTensor) -> _Storage:
    return t.storage.root or t.storage


def _array(t: _LazyTensor, raw: np.ndarray, sole: bool, byteorder: str, what: str):
    """One tensor from its root storage's bytes ``raw``, in native byte order."""
    storage, dtype = t.storage, t.dtype
    raw = raw[storage.start * storage.dtype.itemsize :][: storage.numel * storage.dtype.itemsize]
    flat = raw[: len(raw) // dtype.itemsize * dtype.itemsize].view(dtype)
    if byteorder == "big" and dtype.itemsize > 1:
        itemsize = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
        flat = flat.view(f"u{itemsize}").byteswap().view(dtype)
    if 0 in t.shape:
        return np.zeros(t.shape, dtype)
    last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride, strict=True))
    if last >= len(flat):
        raise TorchFileError(
            f"{what} {t.shape} reaches element {last} of a storage of {len(flat)} (corrupt file)"
        )
    size = int(np.prod(t.shape, dtype=np.int64))
    if sole and t.offset == 0 and size == len(flat) and _is_contiguous(t.shape, t.stride):
        return flat.reshape(t.shape)  # the storage's own buffer: no copy
    view = np.lib.stride_tricks.as_strided(
        flat[t.offset :], t.shape, [s * dtype.itemsize for s in t.stride], writeable=False
    )
    return np.array(view, order="C")


def _check_expansion(unique: list[_LazyTensor], source: str, limits: TorchLimits) -> None:
    """Refuse tensors that would take far more memory than the storages they view."""
    roots = {id(_root(t)): _root(t) for t in unique}.values()
    stored = sum(r.numel * r.dtype.itemsize for r in roots)
    built = sum(math.prod(t.shape) * t.dtype.itemsize for t in unique)
    bound = limits.max_expansion * stored + limits.expansion_allowance
    if built > bound:
        raise TorchFileError(
            f"{source}: its tensors would take {built} bytes from {stored} bytes of storage "
            f"(strides that repeat elements, or many tensors over one storage), over "
            f"TorchLimits max_expansion={limits.max_expansion} / expansion_allowance="
            f"{limits.expansion_allowance}. If you trust the file, pass larger bounds."
        )


def _materialize(
    tensors: dict[str, _LazyTensor], reader, source: str, limits: TorchLimits
) -> dict[str, np.ndarray]:
    """Read each storage once, in file order, and free it once its tensors are built."""
    names = {id(t): name for name, t in reversed(tensors.items())}
    unique = sorted(
        {id(t): t for t in tensors.values()}.values(),
        key=lambda t: reader.position(_root(t).key),
    )
    _check_expansion(unique, source, limits)
    users = collections.Counter(_root(t).key for t in unique)
    pending = collections.Counter(users)
    buffers: dict[str, np.ndarray] = {}
    arrays: dict[int, np.ndarray] = {}
    for t in unique:
        root = _root(t)
        if root.key not in buffers:
            buffers[root.key] = np.frombuffer(reader.read(root), dtype=np.uint8)
        what = f"{source}: tensor {names[id(t)]!r}"
        arrays[id(t)] = _array(t, buffers[root.key], users[root.key] == 1, reader.byteorder, what)
        pending[root.key] -= 1
        if not pending[root.key]:
            del buffers[root.key]
    return {name: arrays[id(t)] for name, t in tensors.items()}


# --------------------------------------------------------------------------- public


def load_torch_file(
    path: str | os.PathLike, *, unwrap: bool = True, limits: TorchLimits | None = None
) -> dict[str, np.ndarray]:
    """Every tensor of a PyTorch checkpoint as ``{dotted key: numpy array}``, read without
    torch and without running code from the file.

    **Arguments:**

    - `path`: a file written by ``torch.save`` (zip layout, torch >= 1.6) or in torch's
      legacy layout (``_use_new_zipfile_serialization=False``, older torch).
    - `unwrap`: when the file holds a training checkpoint, a dict without tensors at its top
      level that has a dict under ``"state_dict"``, ``"model_state_dict"``, ``"model"`` or
      ``"module"`` (the first present, in that order), return only that dict's tensors
      (optimizer state, epoch etc. are not read).
    - `limits`: bounds on the work and memory a file may ask for (``TorchLimits``; default
      ``DEFAULT_LIMITS``, which admits every real checkpoint).

    Nested containers are flattened into dotted keys: dict keys and list/tuple indices are
    joined with ``"."`` (``{"enc": {"w": t}, "blocks": [t0, t1]}`` gives ``"enc.w"``,
    ``"blocks.0"``, ``"blocks.1"``); values that are not tensors are dropped; a file holding
    one bare tensor gives the key ``""``.

    Arrays come back in native byte order with their dtype (float32/16/64, bfloat16 via
    ``ml_dtypes``, int8/16/32/64, uint8, bool, complex, and the float8 / uint16-64 dtypes of
    torch >= 2.1). Views of shared storages are copied into their own C-contiguous arrays; a
    tensor that is alone on its storage is returned in the storage's buffer, uncopied.

    **Raises:** ``UnsafeCheckpointError`` (a ``ValueError``) when the file names any Python
    global besides torch's tensor-rebuild functions, storage classes and dtypes and
    ``collections.OrderedDict`` (a pickled function, object or nn.Module): nothing it names
    is imported or called. ``TorchFileError`` (also a ``ValueError``) for files that are
    truncated, corrupt (zip CRC-32 included) or not PyTorch checkpoints, and for files
    past a bound of ``limits``.
    """
    limits = DEFAULT_LIMITS if limits is None else limits
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            try:
                # torch's own test (serialization._is_zipfile): a local file header first.
                is_zip = f.read(4) == b"PK\x03\x04"
                f.seek(0)
                reader = (_ZipReader if is_zip else _LegacyReader)(f, source, limits)
                obj = reader.load_object()
                tensors: dict[str, _LazyTensor] = {}
                budget = [limits.max_objects, limits.max_objects]
                _lazy_tensors(_unwrap(obj) if unwrap else obj, "", tensors, set(), budget)
                return _materialize(tensors, reader, source, limits)
            except TorchFileError as e:
                if source not in str(e):  # say which file, once
                    raise type(e)(f"{source}: {e}") from None
                raise
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
                raise TorchFileError(_corrupt(source, e)) from None
            except (AttributeError, IndexError, KeyError, struct.error, zipfile.BadZipFile) as e:
                raise TorchFileError(_corrupt(source, e)) from None
            except (MemoryError, RecursionError) as e:
                raise TorchFileError(_corrupt(source, e)) from None
    except OSError as e:
        raise TorchFileError(f"Cannot read {source}: {e}") from None


def _corrupt(source: str, e) -> str:
    detail = f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else str(e)
    return (
        f"{source} is not a readable PyTorch checkpoint (truncated, corrupt, or another "
        f"format): {detail}"
    )
