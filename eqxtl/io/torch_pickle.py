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

import numpy as np

from ..errors import TorchFileError, UnsafeCheckpointError
from ._torch_unpickler import LazyTensor, RestrictedUnpickler, Storage, StorageType

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


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


# --------------------------------------------------------------------------- the two layouts


def _storage_type(x) -> np.dtype:
    if not isinstance(x, StorageType):
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
        self.storages: dict[str, Storage] = {}
        order = self.prefix + "byteorder"
        self.byteorder = "little"
        if order in names:
            if self.zf.getinfo(order).file_size > 16:
                raise TorchFileError(f"{source}: malformed byteorder entry")
            self.byteorder = self.zf.read(order).decode("ascii", "replace").strip()
            if self.byteorder not in ("little", "big"):
                raise TorchFileError(f"{source}: unknown byte order {self.byteorder!r}")

    def record(self, data: tuple) -> Storage:
        if len(data) != 4:
            raise TorchFileError(f"malformed storage record {data!r}")
        storage_type, key, _location, numel = data
        dtype, numel, key = _storage_type(storage_type), _count(numel, "numel"), str(key)
        if key not in self.storages:
            self.storages[key] = Storage(key, dtype, numel)
        return self.storages[key]

    def load_object(self):
        info = self.zf.getinfo(self.prefix + "data.pkl")
        _check_pickle_size(info.file_size, self.source, self.limits)
        data = self.zf.read(info)  # bounded above; zipfile checks its CRC
        return RestrictedUnpickler(io.BytesIO(data), self.source, self.record).load()

    def position(self, key: str) -> int:
        try:
            return self.zf.getinfo(f"{self.prefix}data/{key}").header_offset
        except KeyError:
            return -1  # reported by read()

    def read(self, storage: Storage) -> memoryview:
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
        self.storages: dict[str, Storage] = {}
        self.byteorder = "little"
        magic = RestrictedUnpickler(f, source).load()
        if magic != _MAGIC_NUMBER:
            raise TorchFileError(
                f"{source} is neither a zip archive nor a legacy torch pickle (no magic "
                "number): not a PyTorch checkpoint, or corrupt."
            )
        protocol = RestrictedUnpickler(f, source).load()
        if protocol != _PROTOCOL_VERSION:
            raise TorchFileError(f"{source}: unsupported legacy protocol version {protocol!r}")
        sys_info = RestrictedUnpickler(f, source).load()
        if isinstance(sys_info, Mapping) and sys_info.get("little_endian") is False:
            self.byteorder = "big"

    def record(self, data: tuple) -> Storage:
        if len(data) != 5:
            raise TorchFileError(f"malformed storage record {data!r}")
        storage_type, root_key, _location, numel, view = data
        dtype, numel, root_key = _storage_type(storage_type), _count(numel, "numel"), str(root_key)
        if root_key not in self.storages:
            self.storages[root_key] = Storage(root_key, dtype, numel)
        root = self.storages[root_key]
        if view is None:
            return root
        # Storage views: written by torch < 0.4 only.
        if not isinstance(view, tuple) or len(view) != 3:
            raise TorchFileError(f"malformed storage view {view!r}")
        view_key, start, size = str(view[0]), _count(view[1], "offset"), _count(view[2], "size")
        if start + size > root.numel:
            raise TorchFileError(f"{self.source}: storage view beyond its storage")
        return self.storages.setdefault(view_key, Storage(view_key, dtype, size, root, start))

    def load_object(self):
        obj = RestrictedUnpickler(self.f, self.source, self.record).load()
        keys = RestrictedUnpickler(self.f, self.source).load()
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

    def read(self, storage: Storage) -> bytearray:
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
    obj, prefix: str, out: dict[str, LazyTensor], ancestors: set[int], budget: list[int]
) -> None:
    if isinstance(obj, LazyTensor):
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
        if isinstance(v, (LazyTensor, dict, list, tuple)):
            _lazy_tensors(v, f"{prefix}.{k}" if prefix else str(k), out, ancestors, budget)
    ancestors.discard(id(obj))


def _unwrap(obj):
    """The state dict inside a training checkpoint ``{"state_dict": {...}, "epoch": ...}``."""
    if not isinstance(obj, Mapping) or any(isinstance(v, LazyTensor) for v in obj.values()):
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


def _root(t: LazyTensor) -> Storage:
    return t.storage.root or t.storage


def _array(t: LazyTensor, raw: np.ndarray, sole: bool, byteorder: str, what: str):
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


def _check_expansion(unique: list[LazyTensor], source: str, limits: TorchLimits) -> None:
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
    tensors: dict[str, LazyTensor], reader, source: str, limits: TorchLimits
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
                tensors: dict[str, LazyTensor] = {}
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
