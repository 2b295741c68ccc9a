"""CLIP as CLIP: the tokenizer, the text tower, both towers, zero-shot heads, WiSE-FT, LP-FT.

Parity against transformers 5 (float32, max |Δ| <= 1e-4) at the real ViT-B/32 configuration
(random init, LayerNorms perturbed); the tokenizer against transformers' CLIPTokenizer and
CLIPTokenizerFast on the real CLIP BPE vocabulary (tests/fixtures/clip_bpe).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import gzip
import json
import shutil
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from skimage import data as skdata

import eqxtl
from eqxtl.models.clip_text import CLIP, CLIPText
from tests.test_fit import PNG_SIGNATURE, colour_task

TOL = 1e-4  # max |Δ| against transformers, float32
BPE = Path(__file__).parent / "fixtures" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
PROMPTS = [
    "a photo of a cat",
    "a photo of a dog",
    "a cup of coffee",
    "an astronaut",
    "a rocket on the launch pad",
    "a close-up photo of a brick wall",
    "grass",
    "A PHOTO OF A CAMERAMAN!",
    "two coins, on a table...",
    "an emoji 😀 and ünïcödé",
]
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "coins")


# ---------------------------------------------------------------- fixtures


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> unicode table (open_clip tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_vocab(folder: Path) -> Path:
    """vocab.json + merges.txt from the BPE file exactly as open_clip's SimpleTokenizer
    builds its vocabulary: bytes, bytes + '</w>', the first 49152-256-2 merges, then the two
    special tokens (49408 entries)."""
    lines = gzip.open(BPE).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps(dict(zip(vocab, range(len(vocab)), strict=True)), ensure_ascii=False)
    )
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    return write_clip_vocab(tmp_path_factory.mktemp("clip_vocab"))


@pytest.fixture(scope="module")
def tokenizer_json_dir(vocab_dir, tmp_path_factory) -> Path:
    """transformers' own tokenizer.json (+ tokenizer_config.json) for the same vocabulary."""
    out = tmp_path_factory.mktemp("clip_tokenizer_json")
    transformers.CLIPTokenizer.from_pretrained(vocab_dir).save_pretrained(out)
    assert (out / "tokenizer.json").is_file()
    return out


def varied_texts(n: int = 1200, seed: int = 0) -> list[str]:
    """Deterministic mix of words, casing, contractions, digits, punctuation, whitespace
    runs, unicode scripts, combining marks, emoji (ZWJ, skin tones, flags), special-token
    look-alikes, html entities and over-long texts."""
    rng = np.random.default_rng(seed)
    pieces = [
        "a",
        "photo",
        "of",
        "the",
        "Cat",
        "DOG",
        "tabby",
        "espresso",
        "astronaut's",
        "don't",
        "WE'LL",
        "it's",
        "they're",
        "I'm",
        "you've",
        "he'd",
        "'s",
        "rock-paper",
        "scissors",
        "e-mail",
        "U.S.A.",
        "3.14159",
        "42",
        "2026",
        "1st",
        "x86_64",
        "#hash",
        "@user",
        "http://example.com/a?b=c&d=e",
        "foo@bar.com",
        "C++",
        "naïve",
        "café",
        "Ünïcödé",
        "straße",
        "ÆØÅ",
        "ﬁ",
        "Ⅻ",
        "½",
        "²",
        "東京",
        "北京大学",
        "日本語のテキスト",
        "한국어",
        "Привет",
        "мир",
        "Ελληνικά",
        "עברית",
        "العربية",
        "हिन्दी",
        "ไทย",
        "e\u0301",
        "n\u0303",
        "\u212b",
        "😀",
        "👍🏽",
        "👨‍👩‍👧‍👦",
        "🇫🇷",
        "🏳️‍🌈",
        "❤️",
        "🐱",
        "☕",
        "...",
        "!!!",
        "?!",
        ",",
        ";",
        ":",
        "()",
        "[]",
        "{}",
        "<>",
        "--",
        "—",
        "–",
        "…",
        "«quoted»",
        "“smart”",
        "‘single’",
        "`tick`",
        "~",
        "^",
        "$5",
        "€10",
        "£",
        "¥",
        "%",
        "&amp;",
        "&lt;b&gt;",
        "<b>bold</b>",
        "\\n",
        "\\",
        "/",
        "|",
        "_",
        "*",
        "=+",
        "<|endoftext|>",
        "<|startoftext|>",
        "<|ENDOFTEXT|>",
        "<|endof",
        "text|>",
        "</w>",
        "\u200b",
        "\ufeff",
        "\u00ad",
        "\x00",
        "\x7f",
    ]
    spaces = [" ", " ", " ", "  ", "\t", "\n", " \n\t ", "\u00a0", "\u3000", "\u2003", "   "]
    out = ["", " ", "\t\n", "a", "A", "<|endoftext|>", "😀" * 80, "a " * 200, "word" * 100]
    while len(out) < n:
        k = int(rng.choice([1, 2, 3, 5, 8, 13, 40, 120]))
        words = [pieces[int(i)] for i in rng.integers(0, len(pieces), k)]
        seps = [spaces[int(i)] for i in rng.integers(0, len(spaces), k)]
        text = "".join(w + s for w, s in zip(words, seps, strict=True))
        if rng.random() < 0.3:
            text = spaces[int(rng.integers(len(spaces)))] + text
        if rng.random() < 0.2:
            text = text.upper()
        out.append(text)
    return out


def perturb_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """LayerNorm scales/biases away from 1/0 (random init would leave them trivial) and a
    non-default temperature, so that a swapped or missing tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
        if hasattr(model, "logit_scale"):
            model.logit_scale.fill_(3.1)


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def b32(tmp_path_factory):
    """transformers CLIPModel at the real openai/clip-vit-base-patch32 config (its text
    config says eos_token_id=2, bos 0, pad 1), random init, norms perturbed, saved; and the
    eqxtl CLIP loaded from that folder."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(eos_token_id=2, bos_token_id=0, pad_token_id=1),
        projection_dim=512,
    )
    ref = transformers.CLIPModel(config).eval()
    perturb_norms(ref)
    folder = save_hf(ref, tmp_path_factory.mktemp("clip_b32"))
    clip, _ = eqxtl.from_pretrained(folder, towers="both")
    return ref, clip, folder


def tiny_hf_config(**text) -> transformers.CLIPConfig:
    return transformers.CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            **text,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.manual_seed(1)
    ref = transformers.CLIPModel(tiny_hf_config()).eval()
    perturb_norms(ref, seed=1)
    folder = save_hf(ref, tmp_path_factory.mktemp("clip_tiny"))
    clip, _ = eqxtl.from_pretrained(folder, towers="both")
    return ref, clip, folder


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Real photos preprocessed as CLIP's checkpoints expect: (6, 3, 224, 224) float32."""
    return np.stack(
        [eqxtl.preprocess(getattr(skdata, n)(), eqxtl.CLIP_PREPROCESSING) for n in PHOTOS]
    )


@pytest.fixture(scope="module")
def tokenizer(vocab_dir) -> eqxtl.Tokenizer:
    return eqxtl.Tokenizer.from_pretrained(vocab_dir)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("files", ["vocab_merges", "tokenizer_json"])
def test_tokenizer_ids_equal_transformers(files, vocab_dir, tokenizer_json_dir):
    folder = vocab_dir if files == "vocab_merges" else tokenizer_json_dir
    texts = varied_texts()
    assert len(texts) >= 1000
    ours = eqxtl.Tokenizer.from_pretrained(folder)(texts)
    assert ours.shape == (len(texts), 77) and ours.dtype == np.int32
    # transformers 5 has one class under both names (tokenizers-backed); should they part
    # again, both are compared.
    for cls in dict.fromkeys((transformers.CLIPTokenizer, transformers.CLIPTokenizerFast)):
        ref = cls.from_pretrained(folder)
        want = ref(texts, padding="max_length", truncation=True, max_length=77)["input_ids"]
        want = np.asarray(want)
        bad = np.flatnonzero((want != ours).any(-1))
        assert bad.size == 0, (cls.__name__, [texts[i] for i in bad[:3]])
    # What the test covers: truncated rows end in <|endoftext|>, short rows are padded
    # with the pad token, and the special-token strings inside texts are recognised.
    full = ours[:, -1] == 49407
    assert full.any() and (ours[:, 0] == 49406).all()
    assert (ours == 49407).sum(-1).min() >= 1
    assert eqxtl.Tokenizer.from_pretrained(folder).pad_token_id == 49407


def test_tokenizer_basics(tokenizer):
    ids = tokenizer("A   Photo\tof a CAT.")
    assert ids.shape == (77,)
    assert tokenizer.decode(ids) == "a photo of a cat ."
    assert (tokenizer(["x", "y"])[:, 0] == tokenizer.bos_token_id).all()
    assert tokenizer([]).shape == (0, 77)
    short = eqxtl.Tokenizer(tokenizer.backend, context_length=8)("one two three four five six")
    assert short.shape == (8,) and short[-1] == tokenizer.eos_token_id
    with pytest.raises(eqxtl.DataError, match="strings"):
        tokenizer(["ok", 3])


def test_tokenizer_from_the_hub_offline_fails_clearly(tmp_path):
    for source in ("openai/clip-vit-base-patch32", "clip-vit-base-patch32"):
        with pytest.raises(eqxtl.SourceError, match="openai/clip-vit-base-patch32"):
            eqxtl.Tokenizer.from_pretrained(source, cache_dir=tmp_path)


def test_tokenizer_missing_files_name_the_file(vocab_dir, tmp_path):
    only_vocab = tmp_path / "only_vocab"
    only_vocab.mkdir()
    shutil.copy(vocab_dir / "vocab.json", only_vocab)
    with pytest.raises(eqxtl.CheckpointError, match=r"merges\.txt is missing"):
        eqxtl.Tokenizer.from_pretrained(only_vocab)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(eqxtl.CheckpointError, match=r"no tokenizer\.json.*vocab\.json and"):
        eqxtl.Tokenizer.from_pretrained(empty)


# ---------------------------------------------------------------- text tower


def test_text_tower_matches_transformers_at_b32(b32, tokenizer):
    ref, clip, _ = b32
    text_ref = transformers.CLIPTextModelWithProjection(ref.config.text_config).eval()
    own = {k: v for k, v in ref.state_dict().items() if k.startswith("text_")}
    text_ref.load_state_dict(own, strict=False)  # position_ids buffer aside
    assert text_ref.config.eos_token_id == 2  # the openai checkpoints' legacy pooling rule
    ids = tokenizer(PROMPTS)
    with torch.no_grad():
        out = text_ref(input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
        pooled = text_ref.text_model(input_ids=torch.from_numpy(ids.astype(np.int64)))
    text: CLIPText = clip.text_model
    assert text.config.eos_token_id == 2 and text.config.num_attention_heads == 8
    features = eqx.filter_jit(lambda m, x: m(x))(text, ids)
    embeds = text.project(features)
    assert max_diff(features, pooled.pooler_output) <= TOL
    assert max_diff(embeds, out.text_embeds) <= TOL
    assert float(np.abs(features).max()) > 0.5  # not a degenerate comparison


@pytest.mark.parametrize("eos_token_id", [2, 5])
def test_eos_pooling_rule_matches_transformers(eos_token_id):
    """eos_token_id == 2: the position of the largest id; otherwise the first eos."""
    torch.manual_seed(2)
    config = transformers.CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=8,
        eos_token_id=eos_token_id,
        projection_dim=16,
    )
    ref = transformers.CLIPTextModelWithProjection(config).eval()
    perturb_norms(ref)
    ids = np.array([[0, 40, 5, 70, 5, 2, 9, 9], [0, 2, 99, 5, 1, 1, 1, 1]], np.int32)
    tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
    text = _load_text_tower(tensors, config.to_dict())
    want_index = (
        ids.argmax(-1) if eos_token_id == 2 else (ids == eos_token_id).astype(int).argmax(-1)
    )
    other_index = (ids == 5).argmax(-1) if eos_token_id == 2 else ids.argmax(-1)
    assert (want_index != other_index).all()  # the two rules disagree on these ids
    np.testing.assert_array_equal(text.pooled_index(jnp.asarray(ids)), want_index)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids.astype(np.int64)))
        hidden = ref.text_model(input_ids=torch.from_numpy(ids.astype(np.int64)))
    assert max_diff(text.project(text(jnp.asarray(ids))), want.text_embeds) <= TOL
    assert max_diff(text.hidden_states(jnp.asarray(ids)), hidden.last_hidden_state) <= TOL
    # one text at a time gives what the batch gives
    np.testing.assert_allclose(text(jnp.asarray(ids[1])), text(jnp.asarray(ids))[1], atol=1e-6)


def _load_text_tower(tensors, hf_text_config) -> CLIPText:
    """A text-only file through the same strict fill as CLIP loading."""
    from eqxtl.io import checkpoint
    from eqxtl.models.clip_text import CLIPTextConfig, _text_config_from_hf

    config = _text_config_from_hf({"text_config": hf_text_config, "projection_dim": 16})
    assert isinstance(config, CLIPTextConfig)
    skeleton = eqx.filter_eval_shape(CLIPText, config, key=jax.random.key(0))
    canonical = {
        k.removeprefix("text_model."): v for k, v in tensors.items() if "position_ids" not in k
    }
    text, _ = checkpoint.fill(skeleton, canonical, source="text tower")
    return text


def test_text_tower_rejects_bad_ids(tiny_clip):
    text = tiny_clip[1].text_model
    with pytest.raises(eqxtl.DataError, match="integer token ids"):
        text(jnp.zeros((2, 5)))
    with pytest.raises(eqxtl.DataError, match="tokens per text"):
        text(jnp.zeros((1, 78), jnp.int32))


# ---------------------------------------------------------------- both towers


@pytest.fixture(scope="module")
def b32_outputs(b32, photos, tokenizer) -> dict:
    """transformers' and eqxtl's outputs for the photos against PROMPTS (one compilation)."""
    ref, clip, _ = b32
    ids = tokenizer(PROMPTS)
    with torch.no_grad():
        out = ref(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            pixel_values=torch.from_numpy(photos),
        )
        image_embeds = ref.get_image_features(pixel_values=torch.from_numpy(photos))
    logits, features = eqx.filter_jit(lambda m, x, t: (m(x, t), m.vision_model(x, None)[0]))(
        clip, photos, ids
    )
    return {
        "want_logits": out.logits_per_image.numpy(),
        "want_image_embeds": image_embeds.pooler_output.numpy(),
        "logits": np.asarray(logits),
        "features": features,
    }


def test_clip_logits_per_image_match_transformers_on_photos(b32, b32_outputs):
    _, clip, _ = b32
    assert isinstance(clip, CLIP)
    logits = b32_outputs["logits"]
    assert logits.shape == (len(PHOTOS), len(PROMPTS))
    assert max_diff(logits, b32_outputs["want_logits"]) <= TOL
    assert float(np.ptp(logits)) > 0.1  # the prompts and photos are told apart
    image_embeds = clip.vision_model.project(b32_outputs["features"])
    assert max_diff(image_embeds, b32_outputs["want_image_embeds"]) <= TOL
    assert float(clip.logit_scale) == pytest.approx(3.1)
    # the weights are the transformers ones under transformers' names
    from eqxtl.models.clip_text import clip_state_dict

    names = clip_state_dict(clip)
    ref_names = {k for k in b32[0].state_dict() if not k.endswith("position_ids")}
    assert set(names) == ref_names


def test_zero_shot_head_logits_equal_logits_per_image(b32, b32_outputs, tokenizer):
    """The head on the photos' pooled features (what ``head(x)`` computes after the vision
    tower; ``head(x)`` itself is checked on the tiny model below)."""
    _, clip, _ = b32
    head = eqxtl.zero_shot_head(clip, PROMPTS, templates=["{}"], tokenizer=tokenizer)
    assert isinstance(head, eqxtl.Classifier) and head.num_classes == len(PROMPTS)
    assert head.project and head.normalize
    assert max_diff(head.logits(b32_outputs["features"]), b32_outputs["want_logits"]) <= TOL


def test_zero_shot_head_averages_normalised_template_embeddings(tiny_clip, tokenizer):
    ref, clip, _ = tiny_clip
    classes, templates = ["cat", "coffee mug", "rocket"], list(eqxtl.IMAGENET_TEMPLATES_7)
    head = eqxtl.zero_shot_head(clip, classes, templates=templates, tokenizer=tokenizer)
    ids = tokenizer([t.format(c) for c in classes for t in templates])
    with torch.no_grad():
        emb = ref.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
        emb = emb.pooler_output.numpy().reshape(3, len(templates), -1)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    emb = emb.mean(1)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    assert max_diff(head.head.weight, np.exp(3.1) * emb) <= TOL
    np.testing.assert_array_equal(head.head.bias, 0)
    assert len(eqxtl.IMAGENET_TEMPLATES) == 80 and len(eqxtl.IMAGENET_TEMPLATES_7) == 7
    assert all("{}" in t for t in eqxtl.IMAGENET_TEMPLATES)


def test_a_clip_stored_in_bfloat16_computes_text_in_float32(tiny_clip, tokenizer):
    # token ids carry no dtype: the text tower computed in bfloat16 from the embedding
    # lookup on, and the stored temperature was rounded (exp: 98.9 instead of 100)
    _, clip, _ = tiny_clip
    clip = eqx.tree_at(lambda m: m.logit_scale, clip, jnp.asarray(np.log(100.0), jnp.float32))
    small = eqxtl.quantize(clip, False, "bfloat16")
    assert small.text_model.embeddings.token_embedding.weight.dtype == jnp.bfloat16
    assert small.logit_scale.dtype == jnp.float32
    assert small.logit_scale == clip.logit_scale
    ids = jnp.asarray(tokenizer(["a photo of a cat", "a dog"]))
    got, want = small.encode_text(ids), clip.encode_text(ids)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.02)
    zs = eqxtl.zero_shot_head(small, ["cat", "dog"], templates=["{}"], tokenizer=tokenizer)
    assert zs.head.weight.dtype == jnp.float32


def test_zero_shot_classifier_saves_and_loads(tiny_clip, tokenizer, tmp_path):
    _, clip, _ = tiny_clip
    head = eqxtl.zero_shot_head(clip, ["red", "green"], templates=["a {}."], tokenizer=tokenizer)
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    want, _ = eqxtl.batched(head)(x, eqx.nn.State(head))
    ids = tokenizer(["a red.", "a green."])
    assert max_diff(want, clip.logits(x, ids)) <= 1e-5  # head(x) = CLIP's logits_per_image
    eqxtl.save_pretrained(head, None, tmp_path)
    loaded, state = eqxtl.from_pretrained(tmp_path, keep_head=True)
    assert loaded.project and loaded.normalize
    got, _ = eqxtl.batched(loaded)(x, state)
    np.testing.assert_array_equal(got, want)


def test_zero_shot_bad_inputs(tiny_clip, tokenizer):
    clip = tiny_clip[1]
    with pytest.raises(eqxtl.DataError, match="at least one class"):
        eqxtl.zero_shot_head(clip, [], tokenizer=tokenizer)
    with pytest.raises(eqxtl.DataError, match="no '{}'"):
        eqxtl.zero_shot_head(clip, ["cat"], templates=["a photo of a cat"], tokenizer=tokenizer)
    with pytest.raises(eqxtl.DataError, match="lists of strings"):
        eqxtl.zero_shot_head(clip, "cat", tokenizer=tokenizer)


def test_text_towers_from_a_vision_only_checkpoint_fail_clearly(tmp_path):
    config = tiny_hf_config().vision_config
    vision = transformers.CLIPVisionModelWithProjection(config).eval()
    vision.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(eqxtl.CheckpointError, match="no text tower"):
        eqxtl.from_pretrained(tmp_path, towers="both")
    backbone, _ = eqxtl.from_pretrained(tmp_path)  # vision stays the default
    assert backbone.config.image_size == 32
    with pytest.raises(ValueError, match="towers"):
        eqxtl.from_pretrained(tmp_path, towers="text")


def test_clip_checkpoint_keys_are_strict(tiny_clip, tmp_path):
    import safetensors.numpy

    _, _, folder = tiny_clip
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    del tensors["text_model.final_layer_norm.bias"]
    tensors["text_model.extra.weight"] = np.zeros(3, np.float32)
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path)
    with pytest.raises(eqxtl.CheckpointError, match=r"(?s)final_layer_norm\.bias.*extra"):
        eqxtl.from_pretrained(tmp_path, towers="both")
    # without config.json the config comes from the shapes
    os.remove(tmp_path / "config.json")
    safetensors.numpy.save_file(
        safetensors.numpy.load_file(folder / "model.safetensors"), tmp_path / "model.safetensors"
    )
    with pytest.warns(UserWarning, match="hidden_act is not stored"):
        clip, _ = eqxtl.from_pretrained(tmp_path / "model.safetensors", towers="both")
    assert clip.config.text_config.num_hidden_layers == 2
    assert clip.config.vision_config.patch_size == 8
    # and back: transformers' CLIPModel takes eqxtl's weights under their names, strictly
    from eqxtl.models.clip_text import clip_state_dict

    ref = transformers.CLIPModel(tiny_hf_config())
    missing, unexpected = ref.load_state_dict(
        {k: torch.from_numpy(v.copy()) for k, v in clip_state_dict(clip).items()}, strict=False
    )
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    np.testing.assert_array_equal(
        ref.text_model.final_layer_norm.weight.detach().numpy(),
        tiny_clip[0].text_model.final_layer_norm.weight.detach().numpy(),
    )


# ---------------------------------------------------------------- WiSE-FT


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def perturbed(tree, seed: int):
    """Every floating leaf plus N(0, 0.1) noise (drawn in numpy: no compilation per shape)."""
    rng = np.random.default_rng(seed)

    def shift(x):
        if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating):
            noise = 0.1 * rng.standard_normal(x.shape)
            return jnp.asarray(np.asarray(x) + noise.astype(x.dtype))
        return x

    return jax.tree.map(shift, tree)


def test_interpolate_endpoints_are_bit_exact_and_midpoint_is_the_mean(tiny_clip, tokenizer):
    clip = tiny_clip[1]
    zs = eqxtl.zero_shot_head(clip, ["a", "b", "c"], templates=["{}"], tokenizer=tokenizer)
    zs = eqx.tree_at(lambda m: m.head.bias, zs, jnp.array([-0.0, 0.0, 1.0]))  # signed zero
    ft = perturbed(zs, seed=3)
    for alpha, want in ((0, zs), (0.0, zs), (1, ft)):
        out = eqxtl.interpolate(zs, ft, alpha)
        for got, exp in zip(leaves(out), leaves(want), strict=True):
            assert got.tobytes() == exp.tobytes()
    mid = eqxtl.interpolate(zs, ft, 0.5)
    for got, a, b in zip(leaves(mid), leaves(zs), leaves(ft), strict=True):
        np.testing.assert_array_equal(got, (a + b) / 2)
    assert jax.tree.structure(mid) == jax.tree.structure(zs)
    # a zero-shot model stored in bfloat16 does not round the float32 fine-tuned weights
    small = eqxtl.quantize(zs, False, "bfloat16")
    for alpha in (1, 0.5):
        out = eqxtl.interpolate(small, ft, alpha)
        for got, a, b in zip(leaves(out), leaves(small), leaves(ft), strict=True):
            assert got.dtype == np.promote_types(a.dtype, b.dtype)
            want = (1 - alpha) * a.astype(got.dtype) + alpha * b if alpha < 1 else b
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_interpolate_batchnorm_state_and_mismatches():
    from tests._tiny import tiny

    backbone, state = tiny("resnet", seed=0)
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    other, other_state = perturbed(model, 1), perturbed(state, 2)
    mixed, mixed_state = eqxtl.interpolate(model, other, 0.25, state, other_state)
    for got, a, b in zip(leaves(mixed_state), leaves(state), leaves(other_state), strict=True):
        np.testing.assert_allclose(got, 0.75 * a + 0.25 * b, rtol=1e-6)
    assert len(leaves(mixed_state)) > 0
    with pytest.raises(eqxtl.EqxtlError, match="both states"):
        eqxtl.interpolate(model, other, 0.5, state)
    four = eqxtl.Classifier(backbone, 4, key=jax.random.key(0))
    with pytest.raises(eqxtl.EqxtlError, match=r"head\.weight: shapes"):
        eqxtl.interpolate(model, four, 0.5)
    clip_backbone, _ = tiny("clip")
    with pytest.raises(eqxtl.EqxtlError, match="same structure"):
        eqxtl.interpolate(model, eqxtl.Classifier(clip_backbone, 3, key=jax.random.key(0)), 0.5)
    # a reloaded checkpoint records class names and preprocessing, the model in memory not
    named = other.with_training_info(("x", "y", "z"), eqxtl.preprocessing_for(backbone))
    mixed = eqxtl.interpolate(model, named, 0.25)
    assert mixed.class_names == ("x", "y", "z") and mixed.preprocessing == named.preprocessing
    np.testing.assert_allclose(
        mixed.head.weight, 0.75 * model.head.weight + 0.25 * other.head.weight, rtol=1e-6
    )
    with pytest.raises(eqxtl.EqxtlError, match="name their head rows differently"):
        eqxtl.interpolate(model.with_training_info(("z", "y", "x")), named, 0.5)
    flagged = eqxtl.Classifier(backbone, head=model.head, normalize=True)
    with pytest.raises(eqxtl.EqxtlError, match="static configuration"):
        eqxtl.interpolate(model, flagged, 0.5)
    with pytest.raises(eqxtl.EqxtlError, match="real number"):
        eqxtl.interpolate(model, other, "half")


def test_wise_ft_sweep_and_plot(tiny_clip, tokenizer, tmp_path):
    clip = tiny_clip[1]
    zs = eqxtl.zero_shot_head(clip, ["red", "green", "blue"], templates=["{}"], tokenizer=tokenizer)
    ft = perturbed(zs, seed=4)
    test = colour_task(24, seed=5)
    records = eqxtl.wise_ft(
        zs,
        ft,
        [0, 0.5, 1],
        {"test": test, "shift": colour_task(16, seed=6)},
        batch_size=8,
        plot=tmp_path / "wise.png",
    )
    assert [r["alpha"] for r in records] == [0, 0.5, 1]
    state = eqx.nn.State(zs)
    for record, model in ((records[0], zs), (records[-1], ft)):
        want = eqxtl.evaluate(model, state, test, batch_size=8)
        assert record["test_accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
        assert record["test_loss"] == pytest.approx(want["loss"], rel=1e-5)
    mid = eqxtl.evaluate(eqxtl.interpolate(zs, ft, 0.5), state, test, batch_size=8)
    assert records[1]["test_loss"] == pytest.approx(mid["loss"], rel=1e-5)
    assert (tmp_path / "wise.png").read_bytes()[:8] == PNG_SIGNATURE
    single = eqxtl.wise_ft(zs, ft, [0.5], test, batch_size=8)
    assert single[0]["accuracy"] == pytest.approx(mid["accuracy"], abs=1e-6)


# ---------------------------------------------------------------- LP-FT


def test_lp_ft_learns_and_trains_the_backbone_only_in_phase_two(tiny_clip, tokenizer):
    """LP-FT as two phases of one fit (``two_phases``): the zero-shot head trains on cached
    (projected, normalised) features, then the whole model at a low learning rate."""
    clip = tiny_clip[1]
    model = eqxtl.zero_shot_head(
        clip, ["red", "green", "blue"], templates=["{}"], tokenizer=tokenizer
    )
    state = eqx.nn.State(model)
    p = eqxtl.preprocessing_for(model)
    train = eqxtl.Loader(colour_task(96, seed=0), p, 16, shuffle=True)
    test = eqxtl.Loader(colour_task(48, seed=1), p, 16)
    probes = []
    keep_probe = eqxtl.Lambda(on_phase_begin=lambda run: probes.append(run.model))
    tuned = eqxtl.fit(
        model,
        state,
        train_data=train,
        test_data=test,
        phases=eqxtl.two_phases(model, head_epochs=8, epochs=1, head_lr=0.1, lr=1e-4),
        callbacks=[keep_probe],
        runtime=eqxtl.Runtime(progress=False),
    )
    probe_record = [h for h in tuned.history if h["phase"] == 0][-1]
    assert probe_record["test_accuracy"] >= 0.9, tuned.history
    assert tuned.final["test_accuracy"] >= 0.9, tuned.history
    before, after_probe, after = (leaves(m.backbone) for m in (model, probes[1], tuned.model))
    assert all(np.array_equal(a, b) for a, b in zip(before, after_probe, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(after_probe, after, strict=True))
    assert tuned.model.normalize and tuned.model.project


# ---------------------------------------------------------------- examples/finetune_rps.py


def test_finetune_rps_zero_shot_and_wise_ft_on_tfds_mock_data(
    tiny_clip, vocab_dir, tmp_path, capsys
):
    import tensorflow_datasets as tfds

    from tests.test_fit import _example

    weights = tmp_path / "weights"
    shutil.copytree(tiny_clip[2], weights)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_dir / name, weights)
    out = tmp_path / "out"
    argv = [
        "--weights", str(weights), "--head", "zero-shot", "--train", ".*", "--lr", "1e-4",
        "--batch-size", "8", "--eval-every", "3", "--out", str(out), "--wise-ft", "0", "0.5", "1",
    ]  # fmt: skip
    with tfds.testing.mock_data(num_examples=20):
        result = _example().main(argv)
    printed = capsys.readouterr().out
    assert "zero-shot test accuracy" in printed and "['rock', 'paper', 'scissors']" in printed
    for alpha in ("0", "0.5", "1"):
        assert f"WiSE-FT alpha {alpha}: test accuracy" in printed
    assert result.step == 3 and result.model.normalize
    assert (out / "wise_ft.png").read_bytes()[:8] == PNG_SIGNATURE
    model, _ = eqxtl.from_pretrained(out / "best", keep_head=True)
    assert model.project and model.normalize and model.num_classes == 3


# ---------------------------------------------------------------- open_clip layout

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["open_clip_vit", "open_clip_vit_gelu"])
def test_open_clip_two_towers_match_golden(name):
    """open_clip's own CLIP (golden outputs made by open_clip 3.3.0, see
    tests/fixtures/make_open_clip.py): both towers, argmax pooling, quick_gelu and gelu."""
    import safetensors.numpy

    folder = FIXTURES / name
    golden = np.load(folder / "golden.npz")
    clip, _ = eqxtl.from_pretrained(folder, towers="both")
    assert clip.config.text_config.eos_token_id == 2  # open_clip pools the largest id
    act = "quick_gelu" if name == "open_clip_vit" else "gelu"
    assert clip.config.text_config.hidden_act == act == clip.config.vision_config.hidden_act
    tokens = golden["text_tokens"].astype(np.int32)
    assert max_diff(clip.encode_image(golden["input"]), golden["projected"]) <= TOL
    assert max_diff(clip.encode_text(tokens), golden["text_features"]) <= TOL
    assert float(clip.logit_scale) == float(golden["logit_scale"])
    image = golden["projected"] / np.linalg.norm(golden["projected"], axis=-1, keepdims=True)
    text = golden["text_features"]
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    want = np.exp(golden["logit_scale"]) * image @ text.T
    assert max_diff(clip(golden["input"], tokens), want) <= TOL
    # the PyTorch file reads the same, and the key map writes the open_clip names back
    from_bin, _ = eqxtl.from_pretrained(folder / "open_clip_pytorch_model.bin", towers="both")
    for a, b in zip(leaves(from_bin), leaves(clip), strict=True):
        np.testing.assert_array_equal(a, b)
    from eqxtl.models.clip_text import clip_state_dict

    saved = clip_state_dict(clip, "open_clip")
    original = safetensors.numpy.load_file(folder / "open_clip_model.safetensors")
    original.pop("attn_mask", None)
    assert set(saved) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)


@pytest.mark.parametrize("layout", ["transformers", "open_clip"])
def test_two_tower_clip_saves_in_each_layout(layout, tmp_path):
    """``save_pretrained`` of a two-tower CLIP writes the library's own files (open_clip: the
    same keys and shapes as open_clip's own file; transformers: CLIPModel loads it with no
    missing or unexpected key) and reads back bit-identically."""
    from safetensors.numpy import load_file

    clip, _ = eqxtl.from_pretrained(FIXTURES / "open_clip_vit", towers="both")
    eqxtl.save_pretrained(clip, None, tmp_path, layout=layout)
    if layout == "open_clip":
        saved = load_file(tmp_path / "open_clip_model.safetensors")
        own = load_file(FIXTURES / "open_clip_vit" / "open_clip_model.safetensors")
        assert {k: v.shape for k, v in saved.items()} == {
            k: v.shape for k, v in own.items() if k != "attn_mask"
        }
    else:
        _, info = transformers.CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    again, _ = eqxtl.from_pretrained(tmp_path, towers="both")
    assert again.config == clip.config
    want = eqxtl.state_dict(clip)
    for name, value in eqxtl.state_dict(again).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name]), err_msg=name)
