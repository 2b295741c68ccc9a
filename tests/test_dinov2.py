"""DINOv2: parity with transformers 5 at DINOv2-S/14 with and without registers (input 224
against the checkpoints' 518: positions resampled as transformers does), other input sizes,
timm golden fixtures (plain and no_embed_class registers), save/load in every layout read
by transformers, learnability. (Batching, blocks, remat / scan, LoRA:
tests/test_architectures.py.)"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import eqxtl
from eqxtl.errors import CheckpointError
from eqxtl.io import checkpoint
from eqxtl.models.dinov2 import DINOV2, DINOV2_S14, Dinov2, Dinov2Config
from tests._tiny import random_tensors
from tests._vitfamily import check_learns, perturb, rel_err, same_tree

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-4  # transformers parity, relative to the output scale
GOLDEN_TOL = 1e-5  # timm goldens, relative to the output scale

S14 = dict(
    hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14
)
TINY = dict(
    hidden_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=14
)


def forward(model, state, x):
    return np.asarray(jax.jit(lambda x: model(x, state)[0])(x))


def cls_mean(hidden: np.ndarray, registers: int) -> np.ndarray:
    return np.concatenate([hidden[:, 0], hidden[:, 1 + registers :].mean(1)], axis=-1)


def reference(registers: int, seed: int, **config):
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(**config, num_register_tokens=registers)
        return perturb(transformers.Dinov2WithRegistersModel(cfg), seed)
    return perturb(transformers.Dinov2Model(transformers.Dinov2Config(**config)), seed)


# --------------------------------------------------------------------------------------
# Real-size parity: facebook/dinov2-small's config, with and without registers, input 224.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[0, 4], ids=["plain", "registers"])
def s14(request, tmp_path_factory):
    registers = request.param
    torch.manual_seed(0)
    model = reference(registers, seed=registers, **S14)
    directory = tmp_path_factory.mktemp(f"dinov2_s14_{registers}")
    model.save_pretrained(directory)
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        hidden = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    return registers, directory, x, hidden


def test_parity_s14(s14):
    registers, directory, x, hidden = s14
    model, state = eqxtl.from_pretrained(directory)
    want = dataclasses.replace(
        DINOV2_S14, num_register_tokens=registers, interpolate_antialias=registers > 0
    )
    assert isinstance(model, Dinov2) and model.config == want
    # the checkpoint's 518 positions resampled on the fly for 224, as transformers does
    assert rel_err(forward(model, state, x), hidden[:, 0]) <= TOL
    # ... or once at load time: the same model for 224 inputs
    resized, state = eqxtl.from_pretrained(directory, image_size=224, pooling="cls+mean")
    assert resized.config.image_size == 224
    assert rel_err(forward(resized, state, x), cls_mean(hidden, registers)) <= TOL


# --------------------------------------------------------------------------------------
# Tiny models: other sizes, layouts, saving
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{registers: (directory, transformers model)} for 0 and 2 registers."""
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("dinov2_tiny")
    out = {}
    for registers in (0, 2):
        model = reference(registers, seed=10 + registers, **TINY)
        model.save_pretrained(root / str(registers))
        out[registers] = (root / str(registers), model)
    return out


@pytest.mark.parametrize("registers", [0, 2])
@pytest.mark.parametrize("size", [42, (56, 28)])
def test_other_sizes_match_transformers(tiny, registers, size):
    directory, model = tiny[registers]
    h, w = (size, size) if isinstance(size, int) else size
    x = np.random.default_rng(2).normal(size=(2, 3, h, w)).astype(np.float32)
    with torch.no_grad():
        hidden = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    dynamic, state = eqxtl.from_pretrained(directory)
    assert rel_err(dynamic.hidden_states(x), hidden) <= TOL
    resized, state = eqxtl.from_pretrained(directory, image_size=size)
    assert rel_err(forward(resized, state, x), hidden[:, 0]) <= TOL


def test_save_load_round_trips(tiny, tmp_path):
    for registers in (0, 2):
        directory, reference_model = tiny[registers]
        model, state = eqxtl.from_pretrained(directory)
        for layout in ("transformers", "timm"):
            out = tmp_path / f"{layout}{registers}"
            eqxtl.save_pretrained(model, state, out, layout=layout)
            again, _ = eqxtl.from_pretrained(out)
            flat = checkpoint.state_dict(again)
            for name, value in checkpoint.state_dict(model).items():
                if layout == "timm" and registers and name.startswith("embeddings."):
                    continue  # the class position is folded into cls_token: checked below
                np.testing.assert_array_equal(flat[name], value, err_msg=name)
        # transformers reads what eqxtl wrote
        cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
        reread, info = cls.from_pretrained(
            tmp_path / f"transformers{registers}", output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        x = np.random.default_rng(3).normal(size=(2, 3, 28, 28)).astype(np.float32)
        with torch.no_grad():
            want = reread.eval()(pixel_values=torch.from_numpy(x)).pooler_output
        assert rel_err(forward(model, state, x), want) <= TOL
        timm_model, _ = eqxtl.from_pretrained(tmp_path / f"timm{registers}")
        assert rel_err(forward(timm_model, state, x), want) <= TOL


def test_learns_with_frozen_backbone(tmp_path):
    config = Dinov2Config(**TINY)
    backbone, state = checkpoint.fill(
        checkpoint.skeleton(DINOV2, config), random_tensors(DINOV2, config, seed=0)
    )
    assert check_learns(backbone, state, tmp_path) >= 0.9


# --------------------------------------------------------------------------------------
# timm golden fixtures
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["timm_dinov2", "timm_dinov2_reg"])
def test_timm_golden(name, tmp_path):
    golden = np.load(FIXTURES / name / "golden.npz")
    model, state = eqxtl.from_pretrained(FIXTURES / name)
    x = golden["input"]
    assert model.config.num_register_tokens == (4 if name.endswith("reg") else 0)
    assert rel_err(forward(model, state, x), golden["pooled"]) <= GOLDEN_TOL
    assert rel_err(model.hidden_states(x), golden["features"]) <= GOLDEN_TOL
    probe, state = eqxtl.from_pretrained(FIXTURES / name, pooling="cls+mean")
    assert DINOV2.feature_dim(probe.config) == 64
    assert rel_err(forward(probe, state, x), golden["cls_mean"]) <= GOLDEN_TOL
    pre = eqxtl.preprocessing_for(model)
    assert (pre.crop, pre.mean) == (28, (0.485, 0.456, 0.406))
    # timm -> eqxtl -> timm: the same tensors, bit for bit
    eqxtl.save_pretrained(model, state, tmp_path, layout="timm")
    ours = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    theirs = safetensors.numpy.load_file(FIXTURES / name / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    # timm -> transformers: transformers' model gives timm's features
    eqxtl.save_pretrained(model, state, tmp_path / "hf")
    cls = (
        transformers.Dinov2WithRegistersModel if name.endswith("reg") else transformers.Dinov2Model
    )
    with torch.no_grad():
        out = cls.from_pretrained(tmp_path / "hf").eval()(pixel_values=torch.from_numpy(x))
    assert rel_err(out.last_hidden_state, golden["features"]) <= GOLDEN_TOL


def test_swiglu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="SwiGLU"):
        Dinov2Config(use_swiglu_ffn=True)
    cfg = transformers.Dinov2Config(**TINY, use_swiglu_ffn=True)
    transformers.Dinov2Model(cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="SwiGLU"):
        eqxtl.from_pretrained(tmp_path)


def test_input_checks_and_aliases():
    model = eqxtl.from_config(Dinov2Config(**TINY))[0]
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(np.zeros((3, 30, 28), np.float32), eqxtl.from_config(Dinov2Config(**TINY))[1])
    assert eqxtl.REGISTRY["dinov2-small"][1].repo == "facebook/dinov2-small"
    assert eqxtl.REGISTRY["dinov2-with-registers-small"][1].config.num_register_tokens == 4
    pre = DINOV2.preprocessing(DINOV2_S14)
    assert (pre.resize, pre.crop, pre.interpolation) == (256, 224, "bicubic")
    assert same_tree(model, model)


def test_transformers5_state_dict_names(tiny, tmp_path):
    """transformers 5's in-memory names (``attention.q_proj`` ...) load like its files'."""
    import shutil

    import safetensors.torch

    directory, reference_model = tiny[2]
    tensors = {k: v.contiguous() for k, v in reference_model.state_dict().items()}
    assert "encoder.layer.0.attention.q_proj.weight" in tensors
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(directory / "config.json", tmp_path)
    raw, _ = eqxtl.from_pretrained(tmp_path)
    saved, _ = eqxtl.from_pretrained(directory)
    assert same_tree(raw, saved)
