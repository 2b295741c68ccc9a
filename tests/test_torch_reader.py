"""The torch-free, code-free PyTorch checkpoint reader against ``torch.load``."""

import io
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch  # the test extra installs it: a missing torch fails, never skips

from eqxtl.io.torch_pickle import TorchFileError, UnsafeCheckpointError, load_torch_file

LAYOUTS = pytest.mark.parametrize("zip_layout", [True, False], ids=["zip", "legacy"])


def save(obj, path, zip_layout=True):
    torch.save(obj, path, _use_new_zipfile_serialization=zip_layout)
    return path


def flatten(obj, prefix=""):
    """torch.load's result flattened by load_torch_file's rule (dotted keys, tensors only)."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    out = {}
    for k, v in items:
        if isinstance(v, (torch.Tensor, dict, list, tuple)):
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def assert_same(ours: dict, reference: dict):
    assert list(ours) == list(reference)
    for key, ref in reference.items():
        ref = ref.detach()
        got = ours[key]
        assert got.shape == tuple(ref.shape), key
        if ref.dtype == torch.bfloat16:
            assert got.dtype.name == "bfloat16", key
            np.testing.assert_array_equal(got.astype(np.float32), ref.float().numpy())
        else:
            assert got.dtype == ref.numpy().dtype, key
            np.testing.assert_array_equal(got, ref.numpy())
        assert got.flags.c_contiguous, key


def test_packaged_lite0_matches_torch_load():
    from eqxtl.models.efficientnet import packaged_lite0_path

    path = packaged_lite0_path()
    assert not zipfile.is_zipfile(path)  # the legacy layout
    reference = torch.load(path, weights_only=True)
    ours = load_torch_file(path)
    assert len(ours) == 296
    assert not reference["_conv_stem.weight"].is_contiguous()  # strided views in the file
    assert_same(ours, reference)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
          torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]  # fmt: skip


@LAYOUTS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(tmp_path, dtype, zip_layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g) * 100
    t = x > 0 if dtype == torch.bool else x.to(dtype)
    sd = {"w": t, "scalar": t[1, 2].clone(), "empty": t[:0]}
    path = save(sd, tmp_path / "f.pt", zip_layout)
    assert_same(load_torch_file(path), torch.load(path, weights_only=True))


def test_new_dtypes_rebuild_v3(tmp_path):
    """uint16 and float8 go through _rebuild_tensor_v3 with an UntypedStorage."""
    sd = {
        "u16": torch.arange(6).to(torch.uint16).reshape(2, 3),
        "f8": torch.linspace(-2, 2, 8).to(torch.float8_e4m3fn)[1::2],
    }
    path = save(sd, tmp_path / "f.pt")
    ours = load_torch_file(path)
    np.testing.assert_array_equal(ours["u16"], np.arange(6, dtype=np.uint16).reshape(2, 3))
    assert ours["f8"].dtype.name == "float8_e4m3fn"
    np.testing.assert_array_equal(ours["f8"].astype(np.float32), sd["f8"].float().numpy())


@LAYOUTS
def test_views_sharing_one_storage(tmp_path, zip_layout):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    sd = {
        "full": base,
        "slice": base[2:5, 1:7],
        "transposed": base.t(),
        "row": base[3],
        "strided": base[::2, ::3],
        "element": base[1, 2],
        "broadcast": torch.ones(3, 1).expand(3, 4),  # stride 0
        "permuted": torch.randn(2, 3, 4).permute(2, 0, 1),
    }
    path = save(sd, tmp_path / "views.pt", zip_layout)
    reference = torch.load(path, weights_only=True)
    assert reference["slice"].untyped_storage().data_ptr() == reference["full"].data_ptr()
    ours = load_torch_file(path)
    assert_same(ours, reference)
    ours["full"][...] = -1  # views come back as copies: no aliasing between keys
    assert ours["slice"][0, 0] == 21.0 and ours["slice"].flags.writeable


@LAYOUTS
def test_nested_dicts_lists_and_wrappers(tmp_path, zip_layout):
    t = torch.arange(4.0)
    inner = {"enc": {"w": t, "b": t[:2]}, "blocks": [t * 2, (t * 3, "not a tensor")]}
    checkpoint = {"state_dict": inner, "epoch": 3, "optimizer": {"state": {0: {"m": t + 1}}}}
    path = save(checkpoint, tmp_path / "ckpt.pt", zip_layout)
    reference = torch.load(path, weights_only=True)

    assert_same(load_torch_file(path), flatten(reference["state_dict"]))
    assert list(load_torch_file(path)) == ["enc.w", "enc.b", "blocks.0", "blocks.1.0"]
    everything = load_torch_file(path, unwrap=False)
    assert_same(everything, flatten(reference))
    assert "optimizer.state.0.m" in everything

    shared = {"a": inner, "b": inner}  # one dict under two keys; no wrapper to unwrap
    plain = save(shared, tmp_path / "plain.pt", zip_layout)
    assert_same(load_torch_file(plain), flatten(torch.load(plain, weights_only=True)))

    cycle = [t]
    cycle.append(cycle)
    with pytest.raises(TorchFileError, match="contains itself"):
        load_torch_file(save(cycle, tmp_path / "cycle.pt", zip_layout))


def test_parameters_and_module_state_dict(tmp_path):
    linear = torch.nn.Linear(3, 2)
    for name, obj in [("params", dict(linear.named_parameters())), ("sd", linear.state_dict())]:
        path = save(obj, tmp_path / f"{name}.pt")
        assert_same(load_torch_file(path), torch.load(path, weights_only=True))


def _rewrite_zip(src, dst, compression, byteorder=None):
    """Copy a torch zip; optionally byte-swap its float32 storages and mark them big-endian."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if byteorder and info.filename.endswith("/byteorder"):
                data = byteorder.encode()
            elif byteorder and "/data/" in info.filename:
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            zout.writestr(info.filename, data)
    return dst


def test_big_endian_and_compressed_zip(tmp_path):
    t = torch.randn(4, 3)
    src = save({"w": t, "v": t[1:, ::2]}, tmp_path / "f.pt")
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        big = _rewrite_zip(src, tmp_path / "big.pt", compression, "big")
        ours = load_torch_file(big)
        assert ours["w"].dtype == np.float32 and ours["w"].dtype.isnative
        np.testing.assert_array_equal(ours["w"], t.numpy())
        np.testing.assert_array_equal(ours["v"], t[1:, ::2].numpy())
        deflated = _rewrite_zip(src, tmp_path / "deflated.pt", compression)
        np.testing.assert_array_equal(load_torch_file(deflated)["w"], t.numpy())


def test_reader_never_imports_torch():
    from eqxtl.models.efficientnet import packaged_lite0_path

    code = (
        "import sys\n"
        "import eqxtl.io.torch_pickle as reader\n"
        f"assert len(reader.load_torch_file({str(packaged_lite0_path())!r})) == 296\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------- refusing code


class Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Plain:
    def __init__(self):
        self.weight = torch.zeros(2)


def helper(x):
    return x


@LAYOUTS
@pytest.mark.parametrize(
    "payload, refused",
    [
        ("evil", "posix.system"),
        ("evil_in_state_dict", "posix.system"),
        ("function", "helper"),
        ("instance", "Plain"),
        ("module", "torch.nn.modules.linear.Linear"),
    ],
)
def test_code_is_refused(tmp_path, payload, refused, zip_layout):
    marker = tmp_path / "pwned"
    obj = {
        "evil": lambda: Evil(marker),
        "evil_in_state_dict": lambda: {"w": torch.ones(2), "extra": Evil(marker)},
        "function": lambda: helper,
        "instance": Plain,
        "module": lambda: torch.nn.Linear(2, 2),
    }[payload]()
    path = save(obj, tmp_path / "bad.pt", zip_layout)
    with pytest.raises(UnsafeCheckpointError, match=refused) as excinfo:
        load_torch_file(path)
    assert isinstance(excinfo.value, ValueError)
    assert "safetensors" in str(excinfo.value) and "state dict" in str(excinfo.value)
    assert not marker.exists()


def test_plain_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Evil(marker), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        load_torch_file(path)
    assert not marker.exists()


def _crafted(size, stride, offset=0, build=b""):
    """A zip checkpoint ``{"w": <tensor record>}`` written opcode by opcode, over one float32
    storage of 4 elements, with any (malicious) size, stride and offset."""

    def tup(xs):
        return b"(" + b"".join(b"K" + bytes([x]) for x in xs) + b"t"

    def text(s):
        return b"X" + len(s).to_bytes(4, "little") + s

    pkl = (
        b"\x80\x02}" + text(b"w") + b"ctorch._utils\n_rebuild_tensor_v2\n("
        + b"(" + text(b"storage") + b"ctorch\nFloatStorage\n" + text(b"0") + text(b"cpu")
        + b"K\x04tQ" + b"K" + bytes([offset]) + tup(size) + tup(stride)
        + b"\x89ccollections\nOrderedDict\n)RtR" + build + b"s."
    )  # fmt: skip
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        z.writestr("archive/data/0", np.arange(4, dtype="<f4").tobytes())
    return buf.getvalue()


def test_crafted_records_are_bounds_checked(tmp_path):
    path = tmp_path / "crafted.pt"
    path.write_bytes(_crafted((2, 2), (1, 2), offset=0))
    np.testing.assert_array_equal(load_torch_file(path)["w"], [[0, 2], [1, 3]])
    assert_same(load_torch_file(path), torch.load(path, weights_only=True))
    for size, stride, offset in [((5,), (1,), 0), ((2,), (100,), 0), ((4,), (1,), 1)]:
        path.write_bytes(_crafted(size, stride, offset))
        with pytest.raises(TorchFileError, match="reaches element"):
            load_torch_file(path)
    # BUILD on the tensor placeholder (to rewrite its offset after validation) is refused.
    path.write_bytes(_crafted((4,), (1,), build=b"}" + b"X\x06\x00\x00\x00offsetK\xc8sb"))
    with pytest.raises(TorchFileError, match="BUILD"):
        load_torch_file(path)


# ----------------------------------------------------------------- broken files


def _cases(tmp_path):
    good_zip = save({"w": torch.randn(64, 64)}, tmp_path / "good_zip.pt")
    good_legacy = save({"w": torch.randn(64, 64)}, tmp_path / "good_legacy.pt", False)
    rng = np.random.default_rng(0)
    return {
        "empty": b"",
        "garbage": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text": b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n",
        "truncated_zip": good_zip.read_bytes()[: good_zip.stat().st_size // 2],
        "truncated_legacy": good_legacy.read_bytes()[: good_legacy.stat().st_size // 2],
        "legacy_no_data": good_legacy.read_bytes()[:-100],
    }


def test_broken_files_give_clear_errors(tmp_path):
    for name, data in _cases(tmp_path).items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        with pytest.raises(TorchFileError) as excinfo:
            load_torch_file(path)
        message = str(excinfo.value)
        assert str(path) in message, name
        assert excinfo.value.__cause__ is None, name  # no chained deep traceback
        assert not isinstance(excinfo.value, UnsafeCheckpointError), name
    with pytest.raises(TorchFileError, match="Cannot read"):
        load_torch_file(tmp_path / "missing.pt")
