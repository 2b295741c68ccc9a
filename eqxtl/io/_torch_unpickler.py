"""The restricted unpickler behind ``torch_pickle``: a whitelist of torch's tensor-rebuild
globals, storage classes and dtypes, each mapped to an inert pure-numpy stand-in; any other
global raises ``UnsafeCheckpointError`` before anything is called."""

from __future__ import annotations

import collections
import pickle
from typing import Any

import ml_dtypes
import numpy as np

from ..errors import TorchFileError, UnsafeCheckpointError

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


class StorageType(_Inert):
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


class Storage(_Inert):
    """A storage named by the pickle: ``numel`` elements of ``dtype``, bytes read later.

    Views (legacy files only) share the root's bytes from ``start`` (in elements)."""

    __slots__ = ("key", "dtype", "numel", "root", "start")

    def __init__(self, key: str, dtype: np.dtype, numel: int, root=None, start: int = 0):
        self._set(key=key, dtype=dtype, numel=numel, root=root, start=start)


class LazyTensor(_Inert):
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


def _tensor(storage, storage_offset, size, stride, dtype=None) -> LazyTensor:
    if not isinstance(storage, Storage):
        raise TorchFileError(f"malformed tensor record: storage {type(storage).__name__}")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise TorchFileError(f"malformed tensor record: storage offset {storage_offset!r}")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise TorchFileError(f"malformed tensor record: size {shape} with stride {strides}")
    return LazyTensor(storage, storage_offset, shape, strides, dtype or storage.dtype)


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
    if isinstance(storage, Storage) and storage.dtype.itemsize != 1:
        raise TorchFileError("malformed tensor record: typed storage in _rebuild_tensor_v3")
    return _tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    _empty_hooks(backward_hooks)
    if not isinstance(data, LazyTensor):
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
    **{("torch", n): StorageType(n, d) for n, d in _STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): StorageType("UntypedStorage", np.dtype(np.uint8)),
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


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals are the whitelist above; ``storage_record`` turns torch's
    persistent ids into ``Storage`` placeholders (``None``: no storages allowed)."""

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
