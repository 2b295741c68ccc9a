"""DINOv2: parity with transformers 5 at DINOv2-S/14 with and without registers (input 224
against the checkpoints' 518: positions resampled as transformers does), other input sizes,
the giant models' SwiGLU MLP at a tiny size (transformers, and a timm golden fixture), timm
golden fixtures (plain and no_embed_class registers), save/load in every layout read by
transformers, learnability. (Batching, blocks, remat / scan, LoRA:
tests/test_architectures.py; the real DINOv2-g against transformers, once:
benchmarks/dinov2_giant_parity.py.)"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses
import shutil
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import eqxtl
from eqxtl.errors import CheckpointError
from eqxtl.io import checkpoint
from eqxtl.models.dinov2 import DINOV2, DINOV2_G14, DINOV2_S14, Dinov2, Dinov2Config
from eqxtl.models.layers import SwiGLU
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


@pytest.mark.parametrize("name", ["timm_dinov2", "timm_dinov2_reg", "timm_dinov2_giant"])
def test_timm_golden(name, tmp_path):
    golden = np.load(FIXTURES / name / "golden.npz")
    model, state = eqxtl.from_pretrained(FIXTURES / name)
    x = golden["input"]
    assert model.config.num_register_tokens == (4 if name.endswith("reg") else 0)
    giant = name.endswith("giant")  # timm's SwiGLUPacked: fc1 (128, 32) = [gate; up]
    assert model.config.use_swiglu_ffn == giant
    assert model.config.intermediate_size == (64 if giant else 128)
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


# --------------------------------------------------------------------------------------
# The giant models' SwiGLU MLP, at a tiny size
# --------------------------------------------------------------------------------------


def test_swiglu_matches_transformers(tmp_path):
    """dinov2-giant's structure, tiny: transformers' files (``weights_in`` = [gate; up]) and
    its in-memory names (``gate_proj`` ...) load to the same model, which matches
    transformers' outputs; saved back, transformers reads it with every key and the same
    outputs. (With registers: the layout round trips of tests/test_architectures.py.)"""
    import safetensors.torch

    torch.manual_seed(3)
    reference_model = reference(0, seed=30, **TINY, use_swiglu_ffn=True)
    reference_model.save_pretrained(tmp_path / "hf")
    x = np.random.default_rng(4).normal(size=(2, 3, 42, 28)).astype(np.float32)
    with torch.no_grad():
        want = reference_model(pixel_values=torch.from_numpy(x))
    model, state = eqxtl.from_pretrained(tmp_path / "hf")
    # 64 * 4 = 256 -> two thirds, 170, rounded up to a multiple of 8
    assert model.config.use_swiglu_ffn and model.config.intermediate_size == 176
    assert isinstance(model.encoder.layer[0].mlp, SwiGLU)
    hidden, pooled = eqx.filter_jit(lambda m, x: (m.hidden_states(x), m(x, state)[0]))(model, x)
    assert rel_err(hidden, want.last_hidden_state) <= TOL
    assert rel_err(pooled, want.pooler_output) <= TOL

    runtime = {k: v.contiguous() for k, v in reference_model.state_dict().items()}
    assert "encoder.layer.0.mlp.gate_proj.weight" in runtime
    (tmp_path / "runtime").mkdir()
    safetensors.torch.save_file(runtime, tmp_path / "runtime" / "model.safetensors")
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "runtime")
    raw, _ = eqxtl.from_pretrained(tmp_path / "runtime")
    assert same_tree(raw, model)

    eqxtl.save_pretrained(model, state, tmp_path / "ours")
    ours = safetensors.numpy.load_file(tmp_path / "ours" / "model.safetensors")
    theirs = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    reread, info = type(reference_model).from_pretrained(
        tmp_path / "ours", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        again = reread.eval()(pixel_values=torch.from_numpy(x)).last_hidden_state
    assert rel_err(again, want.last_hidden_state) <= 1e-6


def test_swiglu_config():
    assert DINOV2_G14.intermediate_size == 4096  # facebook/dinov2-giant's weights_out: 4096
    assert eqxtl.REGISTRY["dinov2-giant"][1].config == DINOV2_G14
    giant_registers = eqxtl.REGISTRY["dinov2-with-registers-giant"][1]
    assert giant_registers.config.use_swiglu_ffn and giant_registers.config.num_register_tokens
    shapes = {
        k: tuple(v.shape)
        for k, v in checkpoint.array_shapes(checkpoint.skeleton(DINOV2, DINOV2_G14)).items()
    }
    assert DINOV2.infer_config(shapes) == DINOV2_G14
    config = DINOV2.config_from_hf(DINOV2.config_to_hf(DINOV2_G14))
    assert config == DINOV2_G14
    # a width transformers' rounding cannot give
    shapes["encoder.layer.0.mlp.gate_proj.weight"] = (4100, 1536)
    with pytest.raises(CheckpointError, match="multiple of 8"):
        DINOV2.infer_config(shapes)


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
    import safetensors.torch

    directory, reference_model = tiny[2]
    tensors = {k: v.contiguous() for k, v in reference_model.state_dict().items()}
    assert "encoder.layer.0.attention.q_proj.weight" in tensors
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(directory / "config.json", tmp_path)
    raw, _ = eqxtl.from_pretrained(tmp_path)
    saved, _ = eqxtl.from_pretrained(directory)
    assert same_tree(raw, saved)
