"""Every golden fixture under tests/fixtures is complete, parses, and is self-consistent.

The fixtures are made by timm/open_clip (tests/fixtures/make_*.py, run by hand in a venv where
those libraries import); CI only reads them. This checks the files, not eqxtl's loaders.
"""

import gzip
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NAMES = sorted(
    d for d in os.listdir(FIXTURES) if os.path.isfile(os.path.join(FIXTURES, d, "manifest.json"))
)
TOTAL_BYTES = 5_000_000


def _manifest(name):
    with open(os.path.join(FIXTURES, name, "manifest.json")) as f:
        return json.load(f)


def _golden(name):
    with np.load(os.path.join(FIXTURES, name, "golden.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _weights(path):
    """Tensors of a weight file as float64/int arrays, keyed by name (no pickle for .npz)."""
    if path.endswith(".safetensors"):
        return load_file(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in sd.items()}


def test_fixture_set():
    expected = {
        "open_clip_vit",
        "open_clip_vit_gelu",
        "timm_vit_clip",
        "timm_vit_clip_quickgelu",
        "timm_resnet",
        "timm_vit_augreg",
        "timm_dinov2",
        "timm_dinov2_reg",
        "timm_dinov2_giant",
        "timm_mixer",
        "vit_jax_vit",
        "vit_jax_mixer",
        "big_vision_siglip",
    }
    assert expected <= set(NAMES)
    # What the repository stores: identical files (the two open_clip variants share their
    # weights) are one blob.
    blobs = {}
    for root, _, files in os.walk(FIXTURES):
        for f in files:
            if not f.endswith((".py", ".pyc")):
                with open(os.path.join(root, f), "rb") as fh:
                    data = fh.read()
                blobs[hashlib.sha256(data).hexdigest()] = len(data)
    assert sum(blobs.values()) < TOTAL_BYTES, sum(blobs.values())


@pytest.mark.parametrize("name", NAMES)
def test_manifest_and_golden(name):
    m = _manifest(name)
    assert m["library"] in ("timm", "open_clip")
    assert m["versions"][m["library"]] and m["versions"]["torch"]
    g = _golden(name)
    assert set(g) == set(m["golden"]) == set(m["shapes"])
    for k, v in g.items():
        assert list(v.shape) == m["shapes"][k], k
        assert v.dtype != object and np.all(np.isfinite(v)), k
    x = g["input"]
    assert x.dtype == np.float32 and x.ndim == 4 and x.shape[:2] == (2, 3)
    for k in ("pooled", "projected", "logits", "cls_mean", "features", "text_features"):
        if k in g:
            assert g[k].dtype == np.float32 and g[k].shape[0] == 2, k
            assert np.abs(g[k]).max() > 0.1, f"{k} is too small to tell a wrong mapping"


@pytest.mark.parametrize("name", NAMES)
def test_weight_files_agree(name):
    """Every weight file parses and they all hold the same tensors."""
    m = _manifest(name)
    folder = os.path.join(FIXTURES, name)
    files = [f for f in m["files"] if not f.endswith(".json")]
    assert files
    ref = None
    for f in files:
        w = _weights(os.path.join(folder, f))
        assert w, f
        if f.endswith(".npz"):  # JAX layout: flat "/" keys, float32, as the manifest lists
            assert {k: list(v.shape) for k, v in w.items()} == m["keys"]
            assert all(v.dtype == np.float32 for v in w.values())
            assert all(k.startswith(m["key_prefix"]) for k in w)
            continue
        if ref is None:
            ref = w
        else:
            assert set(w) == set(ref), f
            for k in ref:
                np.testing.assert_array_equal(w[k], ref[k], err_msg=f"{f}:{k}")
    for f in m["files"]:
        if f.endswith(".json"):
            with open(os.path.join(folder, f)) as fh:
                cfg = json.load(fh)
            if m["library"] == "timm":
                assert cfg["architecture"] == m["architecture"]
                assert cfg["num_classes"] == m["kwargs"].get("num_classes", cfg["num_classes"])
                pc = cfg["pretrained_cfg"]
                assert len(pc["mean"]) == len(pc["std"]) == 3 and pc["input_size"][0] == 3
            else:
                assert cfg["model_cfg"] == m["model_cfg"]
                assert len(cfg["preprocess_cfg"]["mean"]) == 3


@pytest.mark.parametrize("name", NAMES)
def test_golden_self_consistent(name):
    """Relations between the golden arrays that the library guarantees."""
    m = _manifest(name)
    g = _golden(name)
    if "features" in g and g["features"].ndim == 3:  # token models
        feats, npt = g["features"], m.get("num_prefix_tokens", 0)
        if m.get("global_pool") == "token":
            np.testing.assert_array_equal(g["pooled"], feats[:, 0])
        if m.get("global_pool") == "avg":  # Mixer
            np.testing.assert_allclose(g["pooled"], feats.mean(1), atol=1e-6)
        if "cls_mean" in g:
            d = feats.shape[-1]
            np.testing.assert_array_equal(g["cls_mean"][:, :d], feats[:, 0])
            np.testing.assert_allclose(g["cls_mean"][:, d:], feats[:, npt:].mean(1), atol=1e-6)
    if "features" in g and g["features"].ndim == 4:  # ResNet: global average of NCHW
        np.testing.assert_allclose(g["pooled"], g["features"].mean((2, 3)), atol=1e-6)
    if m["library"] == "open_clip":
        toks = g["text_tokens"]
        vocab = m["model_cfg"]["text_cfg"]["vocab_size"]
        assert (
            toks.dtype == np.int64 and toks.shape[1] == m["model_cfg"]["text_cfg"]["context_length"]
        )
        assert (toks.max(1) == vocab - 1).all() and len(set(toks.argmax(1))) == 2
        assert g["text_features"].shape == g["projected"].shape
        assert g["logit_scale"].shape == ()


def test_clip_bpe_vocab():
    folder = os.path.join(FIXTURES, "clip_bpe")
    with gzip.open(os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz"), "rt") as f:
        lines = f.read().split("\n")
    assert lines[0].startswith('"bpe_simple_vocab_16e6.txt#version')
    # open_clip's tokenizer uses merges[1 : 49152 - 256 - 2 + 1] -> vocab 49408 with SOT/EOT.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    assert len(merges) == 48894 and all(len(m.split()) == 2 for m in merges[:100])
    assert "MIT" in open(os.path.join(folder, "LICENSE")).read()
