"""Checkpoint layouts: open_clip, timm and torchvision files, folders and hub repo ids, loaded
against golden outputs of the real libraries (tests/fixtures, made by timm 1.0.31 and
open_clip 3.3.0 with the scripts beside them), saved back in each layout, and bad input.

Tolerance: 1e-5 relative to the output scale (max |golden|)."""

import json
import shutil
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import eqxtl
from eqxtl.models import resnet
from eqxtl.models._layout import SPLIT3, KeyMap, Map

FIXTURES = Path(__file__).parent / "fixtures"


def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "golden.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def assert_close(got, want, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max()), 1e-12)
    err = float(np.abs(got - want).max()) / scale
    assert err <= 1e-5, f"{what}: max relative error {err:.2e}"


def pooled(model, state, x):
    out, _ = eqxtl.batched(model)(jnp.asarray(x), state)
    return np.asarray(out)


# --------------------------------------------------------------------------- open_clip


@pytest.mark.parametrize("fixture", ["open_clip_vit", "open_clip_vit_gelu"])
@pytest.mark.parametrize("file", ["", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_open_clip_matches_open_clip(fixture, file):
    g = golden(fixture)
    model, state = eqxtl.from_pretrained(FIXTURES / fixture / file)
    want_act = "quick_gelu" if fixture == "open_clip_vit" else "gelu"
    assert model.config.hidden_act == want_act
    assert model.config.num_attention_heads == 4  # from head_width 8, not width // 64
    out = pooled(model, state, g["input"])
    assert_close(out, g["pooled"], "pooled")
    assert_close(model.project(jnp.asarray(out)), g["projected"], "projected")
    # the checkpoint's own preprocessing (open_clip preprocess_cfg) at its size
    pre = eqxtl.preprocessing_for(model)
    assert (pre.crop, pre.interpolation) == (32, "bicubic")


def test_open_clip_without_its_config_warns_and_takes_an_argument(tmp_path):
    g = golden("open_clip_vit")
    shutil.copy(FIXTURES / "open_clip_vit" / "open_clip_pytorch_model.bin", tmp_path)
    with pytest.warns(UserWarning, match="hidden_act is not stored in the weights"):
        model, _ = eqxtl.from_pretrained(tmp_path, num_attention_heads=4)
    assert model.config.hidden_act == "gelu"  # open_clip's own default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, state = eqxtl.from_pretrained(
            tmp_path, num_attention_heads=4, hidden_act="quick_gelu"
        )
    assert_close(pooled(model, state, g["input"]), g["pooled"], "pooled")


def test_quick_gelu_conflict_between_config_and_argument():
    with pytest.raises(eqxtl.CheckpointError, match="config beside the weights says hidden_act"):
        eqxtl.from_pretrained(FIXTURES / "open_clip_vit", hidden_act="gelu")


def test_partial_open_clip_file_names_the_layout_and_the_missing_keys(tmp_path):
    tensors = load_file(FIXTURES / "open_clip_vit" / "open_clip_model.safetensors")
    del tensors["visual.transformer.resblocks.1.mlp.c_fc.weight"]
    del tensors["visual.ln_post.weight"]
    save_file(tensors, tmp_path / "open_clip_model.safetensors")
    shutil.copy(FIXTURES / "open_clip_vit" / "open_clip_config.json", tmp_path)
    with pytest.raises(eqxtl.CheckpointError) as e:
        eqxtl.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "open_clip layout" in msg
    assert "encoder.layers.1.mlp.fc1.weight" in msg and "post_layernorm.weight" in msg
    assert "eqxtl reads" in msg and "timm" in msg


# --------------------------------------------------------------------------- timm CLIP


@pytest.mark.parametrize("fixture", ["timm_vit_clip", "timm_vit_clip_quickgelu"])
@pytest.mark.parametrize("file", ["", "model.safetensors", "state_dict.pth"])
def test_timm_clip_matches_timm(fixture, file):
    g = golden(fixture)
    if file == "state_dict.pth":  # a bare .pth, no config beside it: say what it is
        model, state = eqxtl.from_pretrained(
            FIXTURES / fixture / file,
            layout="timm",
            num_attention_heads=4,
            hidden_act="quick_gelu" if "quickgelu" in fixture else "gelu",
        )
    else:
        model, state = eqxtl.from_pretrained(FIXTURES / fixture / file)
    assert model.config.hidden_act == ("quick_gelu" if "quickgelu" in fixture else "gelu")
    out = pooled(model, state, g["input"])
    assert_close(out, g["pooled"], "pooled")
    assert_close(model.project(jnp.asarray(out)), g["projected"], "projected")
    assert eqxtl.preprocessing_for(model).resize == int(32 / 0.9)  # timm crop_pct 0.9


def test_timm_clip_fine_tuned_on_imagenet_loads_with_its_classifier(tmp_path):
    # timm's `*_clip_*.openai_ft_in1k`: `head` (with a bias) classifies; there is no projection.
    g = golden("timm_vit_clip_in1k")
    folder = FIXTURES / "timm_vit_clip_in1k"
    model, state = eqxtl.from_pretrained(folder, keep_head=True)
    assert isinstance(model, eqxtl.Classifier) and model.num_classes == 10
    assert model.backbone.config.projection_dim is None
    assert_close(pooled(model.backbone, state, g["input"]), g["pooled"], "pooled")
    assert_close(pooled(model, state, g["input"]), g["logits"], "logits")
    backbone, _ = eqxtl.from_pretrained(folder)  # default: the tower alone, head left out
    assert not isinstance(backbone, eqxtl.Classifier)
    assert backbone.config.projection_dim is None

    # Saved back in timm's layout: the same keys and tensors, and timm's config for 10 classes
    # (tests/fixtures/check_saved.py loads such a folder in timm itself).
    eqxtl.save_pretrained(model, state, tmp_path, layout="timm")
    saved, want = load_file(tmp_path / "model.safetensors"), load_file(folder / "model.safetensors")
    assert sorted(saved) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(saved[key], want[key], err_msg=key)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_classes"] == config["model_args"]["num_classes"] == 10
    again, state = eqxtl.from_pretrained(tmp_path)  # an eqxtl folder: the Classifier comes back
    assert_close(pooled(again, state, g["input"]), g["logits"], "logits after save")


def test_timm_clip_head_with_a_bias_is_a_classifier_whatever_the_tag(tmp_path):
    # The `.openai` tag's head is the projection (zero bias); a non-zero bias says classifier.
    tensors = load_file(FIXTURES / "timm_vit_clip" / "model.safetensors")
    tensors["head.bias"] = np.ones_like(tensors["head.bias"])
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(FIXTURES / "timm_vit_clip" / "config.json", tmp_path)
    model, _ = eqxtl.from_pretrained(tmp_path, keep_head=True)
    assert model.backbone.config.projection_dim is None
    np.testing.assert_array_equal(model.head.bias, tensors["head.bias"])
    projection, _ = eqxtl.from_pretrained(FIXTURES / "timm_vit_clip")
    assert projection.config.projection_dim == 24
    with pytest.raises(eqxtl.CheckpointError, match="no classification head"):
        eqxtl.from_pretrained(FIXTURES / "timm_vit_clip", keep_head=True)


# --------------------------------------------------------------------------- timm ResNet


def test_timm_resnet_hub_folder_matches_timm():
    g = golden("timm_resnet")
    model, state = eqxtl.from_pretrained(FIXTURES / "timm_resnet", keep_head=True)
    assert model.backbone.config.hidden_sizes == (16, 32, 64, 128)
    features, _ = eqxtl.batched(model.backbone)(jnp.asarray(g["input"]), state)
    assert_close(features, g["pooled"], "pooled")
    logits, _ = eqxtl.batched(model)(jnp.asarray(g["input"]), state)
    assert_close(logits, g["logits"], "logits")
    pre = eqxtl.preprocessing_for(model)  # from pretrained_cfg: crop_pct 0.95, 224
    assert (pre.crop, pre.resize) == (224, int(224 / 0.95))


def test_timm_resnet_file_inside_the_folder_and_torchvision_pth():
    g = golden("timm_resnet")
    for source in ("model.safetensors", "state_dict.pth"):
        model, state = eqxtl.from_pretrained(FIXTURES / "timm_resnet" / source)
        assert_close(pooled(model, state, g["input"]), g["pooled"], source)


def _hub_cache(tmp_path: Path, repo: str, folder: Path, files: list[str]) -> Path:
    """A Hugging Face cache holding ``files`` of ``repo`` (as hf_hub_download leaves it)."""
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in files:
        shutil.copy(folder / name, snapshot / name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return cache


@pytest.mark.parametrize(
    "repo, fixture, files",
    [
        ("timm/resnet50.a1_in1k", "timm_resnet", ["model.safetensors", "config.json"]),
        (
            "timm/vit_base_patch32_clip_224.openai",
            "timm_vit_clip",
            ["model.safetensors", "config.json"],
        ),
        (
            "laion/CLIP-ViT-tiny",
            "open_clip_vit",
            ["open_clip_pytorch_model.bin", "open_clip_config.json"],
        ),
    ],
)
def test_hub_repo_id_from_the_local_cache(tmp_path, repo, fixture, files):
    g = golden(fixture)
    cache = _hub_cache(tmp_path, repo, FIXTURES / fixture, files)
    model, state = eqxtl.from_pretrained(repo, cache_dir=cache)
    assert_close(pooled(model, state, g["input"]), g["pooled"], repo)


def test_timm_config_naming_an_unknown_architecture(tmp_path):
    shutil.copy(FIXTURES / "timm_resnet" / "model.safetensors", tmp_path)
    config = json.loads((FIXTURES / "timm_resnet" / "config.json").read_text())
    config["architecture"] = "convnext_tiny"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(eqxtl.CheckpointError, match="'convnext_tiny', which eqxtl does not build"):
        eqxtl.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- save back


def _keys_and_shapes(path: Path) -> dict[str, tuple]:
    return {k: v.shape for k, v in load_file(path).items()}


@pytest.mark.parametrize(
    "fixture, layout, weights",
    [
        ("timm_vit_clip", "timm", "model.safetensors"),
        ("timm_vit_clip_quickgelu", "timm", "model.safetensors"),
        ("open_clip_vit", "open_clip", "open_clip_model.safetensors"),
        ("timm_resnet", "timm", "model.safetensors"),
    ],
)
def test_saved_back_in_the_library_layout(tmp_path, fixture, layout, weights):
    """The saved file has exactly the library's own keys and shapes (so its strict loader
    finds no missing or unexpected key; open_clip: the vision tower's), and reloads
    bit-identically, config and preprocessing included."""
    model, state = eqxtl.from_pretrained(FIXTURES / fixture, keep_head=fixture == "timm_resnet")
    eqxtl.save_pretrained(model, state, tmp_path, layout=layout)
    want = _keys_and_shapes(FIXTURES / fixture / weights)
    if layout == "open_clip":
        want = {k: v for k, v in want.items() if k.startswith("visual.")}
    assert _keys_and_shapes(tmp_path / weights) == want
    reloaded, state2 = eqxtl.from_pretrained(tmp_path, keep_head=fixture == "timm_resnet")
    got = eqxtl.state_dict(reloaded, state2)
    for name, value in eqxtl.state_dict(model, state).items():
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(value), err_msg=name)
    backbone = getattr(reloaded, "backbone", reloaded)
    assert backbone.config == getattr(model, "backbone", model).config
    assert eqxtl.preprocessing_for(reloaded) == eqxtl.preprocessing_for(model)


def test_saving_another_layout_replaces_the_old_weight_files(tmp_path):
    model, state = eqxtl.from_pretrained(FIXTURES / "open_clip_vit")
    eqxtl.save_pretrained(model, state, tmp_path, layout="transformers")
    (tmp_path / "notes.txt").write_text("mine")
    eqxtl.save_pretrained(model, state, tmp_path, layout="open_clip")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt",
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]


def test_transformers_reads_the_transformers_layout(tmp_path):
    import torch
    import transformers

    g = golden("open_clip_vit")
    model, state = eqxtl.from_pretrained(FIXTURES / "open_clip_vit")
    eqxtl.save_pretrained(model, state, tmp_path)
    ref, info = transformers.CLIPVisionModelWithProjection.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        out = ref.eval()(torch.from_numpy(g["input"]))
    assert_close(out.image_embeds.numpy(), g["projected"], "transformers image_embeds")


# --------------------------------------------------------------------------- key maps, bad input


def test_key_map_surgery_round_trips():
    keys = KeyMap(
        (
            Map("blocks.{i}.qkv", tuple(f"layers.{{i}}.{p}" for p in "qkv"), SPLIT3),
            Map("layer{s}.{b}", "stages.{s-1}.blocks.{b}"),
        )
    )
    qkv = np.arange(24.0).reshape(6, 4)
    plan = keys.plan(["blocks.3.qkv", "layer2.0.conv.weight", "other"])
    assert plan.unexplained == ("other",)
    assert sorted(plan.recipes) == [
        "layers.3.k",
        "layers.3.q",
        "layers.3.v",
        "stages.1.blocks.0.conv.weight",
    ]
    canonical = {
        n: r.read({"blocks.3.qkv": qkv, "layer2.0.conv.weight": qkv})
        for n, r in plan.recipes.items()
    }
    np.testing.assert_array_equal(canonical["layers.3.k"], qkv[2:4])
    saved = keys.save(canonical)
    np.testing.assert_array_equal(saved["blocks.3.qkv"], qkv)
    assert "layer2.0.conv.weight" in saved


def test_unknown_layout_lists_prefixes_layouts_and_what_to_pass(tmp_path):
    save_file(
        {"encoder.block.0.w": np.zeros((2, 2), np.float32), "decoder.w": np.zeros(2, np.float32)},
        tmp_path / "model.safetensors",
    )
    with pytest.raises(eqxtl.LayoutError) as e:
        eqxtl.from_pretrained(tmp_path / "model.safetensors")
    msg = str(e.value)
    assert "['decoder', 'encoder']" in msg
    assert "clip_vision: transformers, open_clip, timm" in msg
    assert "architecture=" in msg


def test_config_of_one_architecture_over_weights_of_another(tmp_path):
    shutil.copy(FIXTURES / "timm_resnet" / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(eqxtl.CheckpointError, match="weights look like resnet"):
        eqxtl.from_pretrained(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"model_type": "resnet", "depths": 3}'])
def test_broken_config_json_names_the_file(tmp_path, text):
    shutil.copy(FIXTURES / "timm_resnet" / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(eqxtl.CheckpointError, match="config"):
        eqxtl.from_pretrained(tmp_path)


def test_invalid_ignore_regex_and_unknown_alias():
    with pytest.raises(eqxtl.CheckpointError, match="not a valid regular expression"):
        eqxtl.from_pretrained(FIXTURES / "timm_resnet", ignore=["fc.("])
    with pytest.raises(eqxtl.SourceError, match="known aliases"):
        eqxtl.from_pretrained("resnet5O")


def test_integer_weights_in_a_float_slot(tmp_path):
    tensors = load_file(FIXTURES / "timm_resnet" / "model.safetensors")
    tensors["conv1.weight"] = tensors["conv1.weight"].astype(np.int32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(eqxtl.CheckpointError, match="dtype int32"):
        eqxtl.from_pretrained(tmp_path / "model.safetensors")


def test_half_precision_files_load_as_stored_and_bf16_round_trips(tmp_path):
    model, state = eqxtl.from_config(
        resnet.ResNetConfig(
            embedding_size=8, hidden_sizes=(8, 16), depths=(1, 1), layer_type="basic"
        ),
        dtype=jnp.bfloat16,
    )
    assert model.embedder.embedder.convolution.weight.dtype == jnp.bfloat16
    eqxtl.save_pretrained(model, state, tmp_path)
    again, _ = eqxtl.from_pretrained(tmp_path)
    assert again.embedder.embedder.convolution.weight.dtype == jnp.bfloat16
    half, _ = eqxtl.from_pretrained(tmp_path, dtype=jnp.float16)
    assert half.embedder.embedder.convolution.weight.dtype == jnp.float16


def test_type_rules_match_each_architectures_own_layers():
    model, _ = eqxtl.from_pretrained(FIXTURES / "open_clip_vit")
    spec = eqxtl.frozen(model, eqx.nn.LayerNorm)
    flags = jax.tree.leaves(spec)
    frozen = [p for p, v in zip(eqxtl.paths(model), flags, strict=True) if not v]
    assert "pre_layrnorm.weight" in frozen and "encoder.layers.0.layer_norm1.bias" in frozen
    assert all("norm" in p or "layrnorm" in p for p in frozen)
