"""eqxtl.export: a StableHLO program that runs without eqxtl (checked in a fresh interpreter
that imports only jax and numpy) and equals the model, for every registered image
architecture; an ONNX graph that onnxruntime runs, equal to the model, for a convolutional
and a transformer family, at two batch sizes; the metadata a server needs; bad input."""

import json
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqxtl
from eqxtl.models.registry import ARCHITECTURES
from tests._tiny import TINY_CONFIGS, tiny_architecture

IMAGE_ARCHITECTURES = sorted(n for n in TINY_CONFIGS if ARCHITECTURES[n].towers == "vision")


def _inputs(model, n: int, seed: int = 0) -> np.ndarray:
    """``n`` uint8 photos-like images preprocessed as the model wants: ``(n, 3, H, W)``."""
    rng = np.random.default_rng(seed)
    pre = eqxtl.preprocessing_for(model)
    images = rng.integers(0, 256, size=(n, pre.crop + 5, pre.crop + 9, 3), dtype=np.uint8)
    return np.stack([np.asarray(eqxtl.preprocess(im, pre)) for im in images])


@pytest.mark.parametrize("name", IMAGE_ARCHITECTURES)
def test_the_program_equals_the_model(name, tmp_path):
    backbone, state = tiny_architecture(name)
    model = eqxtl.Classifier(backbone, num_classes=3, key=jax.random.key(1))
    pre = eqxtl.preprocessing_for(model)  # convolutional nets take any size: a small one
    model = model.with_training_info(preprocessing=pre.at_size(min(pre.crop, 48)))
    folder = eqxtl.export(model, state, tmp_path / "served")
    exported = jax.export.deserialize(bytearray((folder / "model.stablehlo").read_bytes()))
    x = _inputs(model, 3)
    want = eqx.filter_jit(lambda m, s, x: eqxtl.batched(m)(x, s)[0])(model, state, x)
    np.testing.assert_allclose(exported.call(x), want, rtol=1e-6, atol=1e-6)


def test_runs_without_eqxtl_for_any_batch_size(tmp_path):
    backbone, state = tiny_architecture("resnet")  # BatchNorm statistics baked in
    model = eqxtl.Classifier(backbone, num_classes=3, key=jax.random.key(1))
    model = model.with_training_info(preprocessing=eqxtl.preprocessing_for(model).at_size(40))
    trained = model.with_training_info(["cat", "dog", "owl"])
    folder = eqxtl.export(trained, state, tmp_path / "served")
    x5 = _inputs(model, 5)
    np.save(tmp_path / "x5.npy", x5)
    script = textwrap.dedent(
        f"""
        import json, sys
        import jax, numpy as np
        folder = {str(folder)!r}
        meta = json.load(open(folder + "/metadata.json"))
        data = open(folder + "/" + meta["program"], "rb").read()
        program = jax.export.deserialize(bytearray(data))
        x5 = np.load({str(tmp_path / "x5.npy")!r})
        np.save({str(tmp_path / "y5.npy")!r}, np.asarray(program.call(x5)))
        np.save({str(tmp_path / "y2.npy")!r}, np.asarray(program.call(x5[:2])))
        assert "eqxtl" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    want, _ = eqxtl.batched(model)(jnp.asarray(x5), state)
    np.testing.assert_allclose(np.load(tmp_path / "y5.npy"), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "y2.npy"), want[:2], rtol=1e-6, atol=1e-6)

    meta = json.loads((folder / "metadata.json").read_text())
    pre = eqxtl.preprocessing_for(model)
    assert meta["input"]["shape"] == ["N", 3, pre.crop, pre.crop]
    assert meta["output"] == {"name": "logits", "shape": ["N", 3], "dtype": "float32"}
    assert meta["class_names"] == ["cat", "dog", "owl"]
    assert (
        eqxtl.Preprocessing(
            **{
                **meta["preprocessing"],
                "mean": tuple(meta["preprocessing"]["mean"]),
                "std": tuple(meta["preprocessing"]["std"]),
            }
        )
        == pre
    )


@pytest.mark.parametrize("name", ["resnet", "vit"])  # convolutions + BatchNorm; attention
def test_the_onnx_graph_equals_the_model_in_onnxruntime(name, tmp_path):
    import onnxruntime

    backbone, state = tiny_architecture(name)
    model = eqxtl.Classifier(backbone, num_classes=3, key=jax.random.key(1))
    pre = eqxtl.preprocessing_for(model)
    model = model.with_training_info(["cat", "dog", "owl"], pre.at_size(min(pre.crop, 32)))
    folder = eqxtl.export(model, state, tmp_path / "served", format="onnx")
    meta = json.loads((folder / "metadata.json").read_text())
    assert (meta["format"], meta["program"]) == ("onnx", "model.onnx")
    assert meta["class_names"] == ["cat", "dog", "owl"]
    assert not (folder / "model.stablehlo").exists()
    session = onnxruntime.InferenceSession(str(folder / meta["program"]))
    x = _inputs(model, 3, seed=2)
    want = eqx.filter_jit(lambda m, s, x: eqxtl.batched(m)(x, s)[0])(model, state, x)
    for n in (1, 3):  # one graph, a symbolic batch dimension
        (got,) = session.run(None, {meta["input"]["name"]: x[:n]})
        np.testing.assert_allclose(got, want[:n], rtol=1e-4, atol=1e-4)


def test_bad_input_is_named(tmp_path, monkeypatch):
    backbone, state = tiny_architecture("vit")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        eqxtl.export(backbone, state, tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="format must be one of"):
        eqxtl.export(backbone, state, tmp_path / "out", format="tflite")
    with pytest.raises(TypeError, match="not an eqxtl backbone"):
        eqxtl.export(jnp.ones(3), None, tmp_path / "out")
    adapted = eqxtl.lora(backbone, r".*\.query", rank=2, key=jax.random.key(0))
    for format in ("stablehlo", "onnx"):
        with pytest.raises(eqxtl.AdapterError, match=r"eqxtl\.merge_lora\(model\)"):
            eqxtl.export(adapted, state, tmp_path / "out", format=format)
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # the converter not installed
    with pytest.raises(ImportError, match=r"pip install \"eqxtl\[onnx\]\""):
        eqxtl.export(backbone, state, tmp_path / "out", format="onnx")
    assert not (tmp_path / "out").exists()
