"""Issue 25 (io, tuning, models): nothing silently wrong, clear errors, PEFT files that work
with every transformers 5.x class of a CLIP vision tower."""

import dataclasses
import json
import warnings
import zipfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import eqxtl
from eqxtl._util.atomic import atomic_directory
from eqxtl.models import clip
from eqxtl.models.clip_text import CLIPConfig, CLIPTextConfig
from tests._tiny import TINY_CLIP, TINY_CONFIGS
from tests._tiny import tiny as tiny_model
from tests.test_clip_text import vocab_dir as vocab_dir  # noqa: F401  (fixture)
from tests.test_lora import _torch_perturb, perturb

TOL = 1e-4
QV = r".*\.(q_proj|v_proj)"


@pytest.fixture(scope="module")
def tokenizer(vocab_dir):  # noqa: F811
    return eqxtl.Tokenizer.from_pretrained(vocab_dir)


def two_towers(vocab_size: int = 49408):
    """A tiny random two-tower CLIP (text vocabulary ``vocab_size``)."""
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=16,
    )
    vision = dataclasses.replace(TINY_CLIP, num_hidden_layers=1, projection_dim=16)
    model, _ = eqxtl.from_config(CLIPConfig(vision_config=vision, text_config=text))
    return model


# --------------------------------------------------------------------------- 1. user files


def test_writers_never_replace_a_users_file(tmp_path):
    model, state = tiny_model("resnet")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(FileExistsError, match="path 'notes.txt'|notes.txt.*not a folder"):
        eqxtl.save_pretrained(model, state, notes)
    adapted = eqxtl.lora(model, r".*convolution", rank=2, key=jax.random.key(0))
    with pytest.raises(FileExistsError, match="save_adapter: directory"):
        eqxtl.save_adapter(adapted, notes)
    with pytest.raises(FileExistsError, match="not a directory"):
        with atomic_directory(notes):
            pass
    assert notes.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------- 2. adapter options


def test_lora_options_are_checked():
    model, _ = tiny_model("clip")
    key = jax.random.key(0)
    for alpha in (float("nan"), float("inf"), 0.0, -1.0, True, "8"):
        with pytest.raises(eqxtl.AdapterError, match="alpha must be a finite number > 0"):
            eqxtl.lora(model, QV, rank=2, alpha=alpha, key=key)
    for rank in (2.0, True, 0, -1, np.float32(2)):
        with pytest.raises(eqxtl.AdapterError, match="rank must be a positive integer"):
            eqxtl.lora(model, QV, rank=rank, key=key)
    for dropout in (float("nan"), 1.0, -0.1, "0.1", None):
        with pytest.raises(eqxtl.AdapterError, match="dropout must be a number in"):
            eqxtl.lora(model, QV, rank=2, dropout=dropout, key=key)
    with pytest.raises(eqxtl.AdapterError, match="dora must be True or False"):
        eqxtl.lora(model, QV, rank=2, dora="yes", key=key)
    with pytest.raises(eqxtl.AdapterError, match=r"modules_to_save is a list.*\['head'\]"):
        eqxtl.save_adapter(eqxtl.lora(model, QV, rank=2, key=key), "unused", modules_to_save="head")
    adapted = eqxtl.lora(model, QV, rank=np.int64(2), alpha=np.float32(4), key=key)
    q = adapted.encoder.layers[0].self_attn.q_proj
    assert q.rank == 2 and type(q.alpha) is float and q.alpha == 4.0


def test_load_adapter_checks_the_files_numbers(tmp_path):
    model, _ = tiny_model("clip")
    adapted = eqxtl.lora(model, QV, rank=2, key=jax.random.key(0))
    eqxtl.save_adapter(adapted, tmp_path)
    config_file = tmp_path / "adapter_config.json"
    good = json.loads(config_file.read_text())
    for field, value, words in [
        ("lora_alpha", "NaN", "lora_alpha must be a finite number"),
        ("r", 2.5, "r must be a positive integer"),
        ("rank_pattern", {"q_proj": 0}, "rank_pattern\\['q_proj'\\] must be a positive"),
        ("use_dora", "false", "use_dora must be True or False"),
    ]:
        text = json.dumps({**good, field: value}).replace('"NaN"', "NaN")
        config_file.write_text(text)
        with pytest.raises(eqxtl.CheckpointError, match=f"adapter_config.json: {words}"):
            eqxtl.load_adapter(model, tmp_path)


# --------------------------------------------------------------------------- 3, 4. zero-shot heads


def test_zero_shot_head_checks_names_model_and_token_ids(tokenizer):
    model = two_towers()
    with pytest.raises(eqxtl.DataError, match="repeats 'cat'"):
        eqxtl.zero_shot_head(model, ["cat", "dog", "cat"], tokenizer=tokenizer, templates=["{}"])
    with pytest.raises(TypeError, match='no text tower.*towers="both"'):
        eqxtl.zero_shot_head(model.vision_model, ["cat"], tokenizer=tokenizer, templates=["{}"])
    with pytest.raises(eqxtl.DataError, match="batch_size must be a positive integer"):
        eqxtl.zero_shot_head(model, ["cat"], tokenizer=tokenizer, templates=["{}"], batch_size=0)
    small = two_towers(vocab_size=1000)  # the tokenizer is another model's (49408 ids)
    with pytest.raises(eqxtl.DataError, match="1000 token embeddings"):
        eqxtl.zero_shot_head(small, ["cat"], tokenizer=tokenizer, templates=["{}"])
    ids = tokenizer(["a cat"])
    with pytest.raises(eqxtl.DataError, match="input_ids holds token id 49407"):
        small.encode_text(jnp.asarray(ids))  # eager: the ids are checked
    eqx.filter_jit(lambda m, x: m.encode_text(x))(
        small, ids
    )  # under jit the values are unknown: no check, no error
    ok = small.encode_text(jnp.asarray(np.minimum(ids, 999)))
    assert ok.shape == (1, 16)


def test_zero_shot_head_records_class_names(tokenizer, tmp_path):
    model = two_towers()
    head = eqxtl.zero_shot_head(model, ["cat", "dog"], tokenizer=tokenizer, templates=["{}"])
    assert head.class_names == ("cat", "dog")
    with pytest.raises(ValueError, match="label 0 is 'dog' in the data but row 0 .* 'cat'"):
        head.with_training_info(["dog", "cat"])
    assert head.with_training_info(["cat", "dog"]).class_names == ("cat", "dog")
    eqxtl.save_pretrained(head, None, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog"}
    loaded, _ = eqxtl.from_pretrained(tmp_path, keep_head=True)
    assert loaded.class_names == ("cat", "dog")


# --------------------------------------------------------------------------- 5. errors


def test_bad_json_files_are_named(tmp_path):
    model, state = tiny_model("clip")
    adapted = eqxtl.lora(model, QV, rank=2, key=jax.random.key(0))
    eqxtl.save_adapter(adapted, tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    config_file.write_text('{"peft_type": "LORA", ')
    with pytest.raises(eqxtl.CheckpointError, match="adapter_config.json is not valid JSON"):
        eqxtl.load_adapter(model, tmp_path / "a")
    config_file.write_text("[1, 2]")
    with pytest.raises(eqxtl.CheckpointError, match="holds a JSON list, but PEFT's adapter"):
        eqxtl.load_adapter(model, tmp_path / "a")
    eqxtl.save_pretrained(model, state, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('["clip"]')
    with pytest.raises(eqxtl.CheckpointError, match="config.json holds a JSON list"):
        eqxtl.from_pretrained(tmp_path / "m")


def test_nested_config_of_the_wrong_type_is_named(tmp_path):
    model, state = tiny_model("clip")
    eqxtl.save_pretrained(model, state, tmp_path, layout="open_clip")
    config_file = tmp_path / "open_clip_config.json"
    config = json.loads(config_file.read_text())
    for bad in ({**config, "model_cfg": []}, {**config, "model_cfg": {"vision_cfg": 5}}):
        config_file.write_text(json.dumps(bad))
        with pytest.raises(eqxtl.CheckpointError, match="another JSON type than expected"):
            eqxtl.from_pretrained(tmp_path)


def test_tokenizer_config_that_is_no_object_is_named(vocab_dir, tmp_path):  # noqa: F811
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((vocab_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('"pad"')
    with pytest.raises(eqxtl.CheckpointError, match="tokenizer_config.json holds a JSON str"):
        eqxtl.Tokenizer.from_pretrained(tmp_path)


def test_config_sizes_are_checked(tmp_path):
    for field, value in [("image_size", 0), ("patch_size", 0), ("hidden_size", -4)]:
        with pytest.raises(ValueError, match=f"{field} must be an integer >= 1"):
            dataclasses.replace(TINY_CLIP, **{field: value})
    with pytest.raises(ValueError, match="num_hidden_layers must be an integer >= 0"):
        dataclasses.replace(TINY_CLIP, num_hidden_layers=-1)
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 1"):
        CLIPTextConfig(vocab_size=0)
    model, state = tiny_model("clip")
    eqxtl.save_pretrained(model, state, tmp_path)
    with pytest.raises(ValueError, match="image_size must be an integer >= 1"):
        eqxtl.from_pretrained(tmp_path, image_size=0)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_every_size_field_of_every_config_is_checked(name):
    # Registry-generated: a zero size or a negative layer count is named before any division.
    from eqxtl.models._arch import _COUNTS, _SIZES

    config = TINY_CONFIGS[name]
    parts = [config] + [  # a two-tower config: each tower's own
        getattr(config, f.name)
        for f in dataclasses.fields(config)
        if dataclasses.is_dataclass(getattr(config, f.name))
    ]
    checked = [
        (c, f.name) for c in parts for f in dataclasses.fields(c) if f.name in _SIZES + _COUNTS
    ]
    assert checked, f"{type(config).__name__} has no checked size field"
    for part, field in checked:
        bad = -1 if field in _COUNTS else 0
        value = getattr(part, field)
        if isinstance(value, tuple):
            bad = (bad, *value[1:])
        with pytest.raises(ValueError, match=f"{field} must be an integer >= "):
            dataclasses.replace(part, **{field: bad})


def test_truncated_npz_is_called_truncated(tmp_path):
    np.savez(tmp_path / "full.npz", a=np.arange(1000.0))
    member = zipfile.ZipFile(tmp_path / "full.npz").read("a.npy")
    with zipfile.ZipFile(tmp_path / "cut.npz", "w") as out:
        out.writestr("a.npy", member[:500])
    with pytest.raises(eqxtl.CheckpointError, match="truncated or corrupt"):
        eqxtl.from_pretrained(tmp_path / "cut.npz")


# --------------------------------------------------------------------------- 6. trained classifiers


def test_classifier_keeps_class_names_in_every_layout_with_a_config(tmp_path):
    model, state = tiny_model("clip")
    head = eqxtl.Classifier(model, 2, key=jax.random.key(0), class_names=["no", "yes"])
    head = head.with_training_info(preprocessing=eqxtl.preprocessing_for(model))
    for layout in ("transformers", "open_clip"):
        eqxtl.save_pretrained(head, state, tmp_path / layout, layout=layout)
        loaded, _ = eqxtl.from_pretrained(tmp_path / layout, keep_head=True)
        assert loaded.class_names == ("no", "yes"), layout
        assert loaded.preprocessing == head.preprocessing, layout


def test_classifier_in_a_layout_without_config_files_warns(tmp_path):
    model, state = tiny_model("resnet")
    head = eqxtl.Classifier(model, 2, key=jax.random.key(0), class_names=["no", "yes"])
    with pytest.warns(UserWarning, match="class names and training preprocessing are not"):
        eqxtl.save_pretrained(head, state, tmp_path / "named", layout="torchvision")
    # a bare classifier too: reloading it needs keep_head=True, and the warning says so
    bare = eqxtl.Classifier(model, 2, key=jax.random.key(0))
    with pytest.warns(UserWarning, match=r"backbone alone unless keep_head=True \(its 2"):
        eqxtl.save_pretrained(bare, state, tmp_path / "bare", layout="torchvision")
    assert not isinstance(eqxtl.from_pretrained(tmp_path / "bare")[0], eqxtl.Classifier)
    loaded, _ = eqxtl.from_pretrained(tmp_path / "bare", keep_head=True)
    np.testing.assert_array_equal(loaded.head.weight, bare.head.weight)


# --------------------------------------------------------------------------- 7. aliases


def test_alias_typo_suggests_and_marks_offline():
    with pytest.raises(eqxtl.SourceError, match="Did you mean 'efficientnet-lite0'") as e:
        eqxtl.from_pretrained("efficientnet_lite0")
    assert "'efficientnet-lite0 (offline)'" in str(e.value)
    assert "'resnet50'" in str(e.value)  # a hub alias, not marked


# --------------------------------------------------------------------------- 8. PEFT namings


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny transformers CLIPModel (both towers), saved: every vision class loads it."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=99,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=97,
            eos_token_id=98,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        ),
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("clip_model")
    transformers.CLIPModel(config).eval().save_pretrained(folder)
    return folder


CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")


def _base(cls: str, folder):
    """``cls`` loaded from the CLIPModel folder (transformers does not carry the projection
    size over to a vision config: it is passed)."""
    extra = {"projection_dim": 16} if cls == "CLIPVisionModelWithProjection" else {}
    return getattr(transformers, cls).from_pretrained(folder, **extra).eval()


def _vision(peft_model):
    """The vision tower (pooled features) of a PEFT model in any of the three classes."""
    inner = peft_model.base_model.model
    return getattr(inner, "vision_model", inner)


def _pooled(module, x) -> np.ndarray:
    with torch.no_grad():
        return module(pixel_values=torch.from_numpy(x)).pooler_output.numpy()


@pytest.mark.parametrize("cls", CLASSES)
def test_save_adapter_loads_in_peft_on_every_class(cls, clip_folder, tmp_path):
    backbone, state = eqxtl.from_pretrained(clip_folder)
    first = eqxtl.lora(backbone, r".*layers\.0\..*_proj", rank=2, alpha=4, key=jax.random.key(0))
    both = eqxtl.lora(first, r".*layers\.1\..*(q|v)_proj", rank=1, alpha=8, key=jax.random.key(1))
    adapted = perturb(both, 0)  # ranks and alphas differ: rank_pattern, alpha_pattern
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    ours = np.asarray(eqxtl.batched(adapted)(jnp.asarray(x), state)[0])
    plain = np.asarray(eqxtl.batched(backbone)(jnp.asarray(x), state)[0])
    eqxtl.save_adapter(adapted, tmp_path)
    base = _base(cls, clip_folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    adapted_names = [n for n, _ in theirs_model.named_modules() if n.endswith("q_proj.lora_A")]
    assert len(adapted_names) == 2 and all("text_model" not in n for n in adapted_names)
    theirs = _pooled(_vision(theirs_model), x)
    assert np.abs(ours - plain).max() > 100 * TOL and np.abs(ours - theirs).max() <= TOL


@pytest.mark.parametrize("cls", CLASSES)
def test_load_adapter_reads_peft_files_of_every_class(cls, clip_folder, tmp_path):
    base = _base(cls, clip_folder)
    targets = r".*vision_model\..*\.(q_proj|v_proj)" if cls == "CLIPModel" else ["q_proj", "v_proj"]
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets)
    peft_model = peft.get_peft_model(base, config)
    _torch_perturb(peft_model, 0)
    peft_model.eval().save_pretrained(tmp_path)
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    theirs = _pooled(_vision(peft_model), x)
    backbone, state = eqxtl.from_pretrained(clip_folder)
    adapted = eqxtl.load_adapter(backbone, tmp_path)
    ours = np.asarray(eqxtl.batched(adapted)(jnp.asarray(x), state)[0])
    plain = np.asarray(eqxtl.batched(backbone)(jnp.asarray(x), state)[0])
    assert np.abs(ours - plain).max() > 100 * TOL and np.abs(ours - theirs).max() <= TOL


def test_adapter_namings_that_disagree_are_refused(clip_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    backbone, _ = eqxtl.from_pretrained(clip_folder)
    adapted = perturb(eqxtl.lora(backbone, QV, rank=2, key=jax.random.key(0)), 0)
    eqxtl.save_adapter(adapted, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.encoder.layers.0.self_attn.q_proj.lora_B.weight"
    assert "base_model.model.vision_model." + key[len("base_model.model.") :] in tensors
    tensors[key] = tensors[key] + 1
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(eqxtl.CheckpointError, match="its namings in the file differ"):
        eqxtl.load_adapter(backbone, tmp_path)


def test_clip_vision_architecture_names_its_optional_prefix():
    assert clip.CLIP_VISION.adapter_prefix == "vision_model."


def test_siglip_adapters_both_ways_on_the_flattened_class(tmp_path):
    """SiglipVisionModel is flattened like CLIPVisionModel (no ``vision_model.``)."""
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    transformers.SiglipVisionModel(config).eval().save_pretrained(tmp_path / "base")
    backbone, state = eqxtl.from_pretrained(tmp_path / "base")
    x = np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype(np.float32)
    packed = eqxtl.lora(backbone, QV, rank=2, key=jax.random.key(0))  # + the MAP head's q, v
    with pytest.raises(eqxtl.AdapterError, match="no module for.*head.attention.q_proj"):
        eqxtl.save_adapter(packed, tmp_path / "packed")  # both were written as in_proj_weight
    encoder_qv = r"encoder\..*\.(q_proj|v_proj)"
    adapted = perturb(eqxtl.lora(backbone, encoder_qv, rank=2, key=jax.random.key(0)), 0)
    eqxtl.save_adapter(adapted, tmp_path / "ours")
    base = transformers.SiglipVisionModel.from_pretrained(tmp_path / "base").eval()
    theirs = _pooled(peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval(), x)
    ours = np.asarray(eqxtl.batched(adapted)(jnp.asarray(x), state)[0])
    assert np.abs(ours - theirs).max() <= TOL

    base = transformers.SiglipVisionModel.from_pretrained(tmp_path / "base").eval()
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    _torch_perturb(peft_model, 3)
    peft_model.eval().save_pretrained(tmp_path / "theirs")
    loaded = eqxtl.load_adapter(backbone, tmp_path / "theirs")
    ours = np.asarray(eqxtl.batched(loaded)(jnp.asarray(x), state)[0])
    plain = np.asarray(eqxtl.batched(backbone)(jnp.asarray(x), state)[0])
    theirs = _pooled(peft_model, x)
    assert np.abs(ours - plain).max() > 100 * TOL and np.abs(ours - theirs).max() <= TOL


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_transformers_classifier_that_pools_otherwise_is_refused_with_keep_head(family, tmp_path):
    # transformers' CLIP/SigLIP ...ForImageClassification heads were trained on the mean of
    # the tokens; on eqxtl's features (CLIP's class token, SigLIP's MAP output) the same
    # weights give other logits, and the widths agree, so only the config tells.
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    vision |= dict(num_attention_heads=2, image_size=32, patch_size=16)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    text |= dict(num_attention_heads=2, vocab_size=100, max_position_embeddings=16)
    name = {"clip": "CLIP", "siglip": "Siglip"}[family]
    config = getattr(transformers, f"{name}Config")(
        vision_config=vision, text_config=text, num_labels=3
    )
    reference = getattr(transformers, f"{name}ForImageClassification")(config).eval()
    reference.save_pretrained(tmp_path)
    with pytest.raises(
        eqxtl.CheckpointError, match=f"keep_head=True.*{name}ForImageClassification.*mean"
    ):
        eqxtl.from_pretrained(tmp_path, keep_head=True)
    backbone, state = eqxtl.from_pretrained(tmp_path)  # the backbone still loads
    assert eqxtl.feature_dim(backbone) == 64


@pytest.mark.parametrize(
    "name, act",
    [
        ("vit", "quick_gelu"),
        ("siglip_vision", "silu"),
        ("dinov2", "quick_gelu"),
        ("clip_vision", "gelu_pytorch_tanh"),
    ],  # fmt: skip
)
def test_timm_files_refuse_an_activation_timm_cannot_build(name, act, tmp_path):
    # timm's config.json states gelu, its tanh form, or (CLIP) quick_gelu by name: any other
    # activation was written as the tanh GELU (or CLIP's exact one) and read back as it
    config = dataclasses.replace(TINY_CONFIGS[name], hidden_act=act)
    if name == "vit":  # timm's ViT has no pooler
        config = dataclasses.replace(config, add_pooling_layer=False)
    backbone, state = eqxtl.from_config(config, architecture=name)
    with pytest.raises(eqxtl.CheckpointError, match=f"timm's .*{act}.*layout='transformers'"):
        eqxtl.save_pretrained(backbone, state, tmp_path / "timm", layout="timm")
    assert not (tmp_path / "timm").exists()
    eqxtl.save_pretrained(backbone, state, tmp_path / "hf", layout="transformers")
    again, _ = eqxtl.from_pretrained(tmp_path / "hf")
    assert again.config.hidden_act == act
