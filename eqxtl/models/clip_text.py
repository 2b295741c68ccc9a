"""CLIP's text tower and the two-tower ``CLIP`` model, with transformers' names.

``CLIPText`` is transformers' ``CLIPTextModelWithProjection`` without the ``text_model.``
prefix: its paths read ``embeddings.token_embedding.weight``,
``encoder.layers.3.self_attn.q_proj.weight``, ``final_layer_norm.weight``,
``text_projection.weight``. ``CLIP`` holds both towers and the temperature; its paths are
those of transformers' ``CLIPModel`` except that each projection sits inside its tower
(``vision_model.visual_projection.weight``, ``text_model.text_projection.weight``), so
loading a ``CLIPModel`` file is renaming. ``CLIP_MODEL`` is its ``Architecture``
(``from_pretrained(..., towers="both")``), with transformers and open_clip layouts.

Token ids come from ``eqxtl.Tokenizer``: ``(77,)`` per text, or a batch ``(B, 77)``. The
blocks are the vision tower's (``eqxtl.models.clip.EncoderLayer``) with a causal mask; every
matrix product of a batch sees ``B * tokens`` rows (batch-native, like ``CLIPVision``).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._util.pytree_paths import keypath_to_str
from ..errors import CheckpointError, DataError
from ._arch import (
    Architecture,
    Layout,
    Meta,
    Shapes,
    check_activation,
    check_sizes,
    claims_transformers,
    transformers_write,
)
from ._clip_model import (
    _ACTIVATIONS,
    Activation,
    CLIPVision,
    CLIPVisionConfig,
    Encoder,
    EncoderLayer,
)
from ._layout import SPLIT3, TRANSPOSE, Drop, KeyMap, Map
from .blockwise import run_blocks
from .clip import CLIP_VISION, OPEN_CLIP_FILES
from .layers import LayerNorm
from .layers import dense as _dense
from .layers import linear as _linear


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' ``CLIPTextConfig`` that shape the text tower (defaults:
    openai/clip-vit-base-patch32's text tower).

    ``eos_token_id`` picks the pooled token as transformers 5 does: ``2`` (what the openai
    checkpoints' config.json say, a value from before transformers PR #24773) keeps the
    legacy rule, the position of the largest token id; any other value pools the first
    position holding ``eos_token_id``. With CLIP's own tokenizer both rules pick the
    ``<|endoftext|>`` token (49407, the largest id). ``projection_dim=None``: no
    ``text_projection`` (a plain ``CLIPTextModel``).
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        check_sizes(self)
        check_activation(self, _ACTIVATIONS)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}."
            )


CLIP_TEXT_B32 = CLIPTextConfig(eos_token_id=2, bos_token_id=0)
"""The text tower of openai/clip-vit-base-patch32 (and -patch16), as its config.json says
(``eos_token_id=2``: legacy argmax pooling)."""
CLIP_TEXT_L14 = CLIPTextConfig(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    projection_dim=768,
    eos_token_id=2,
    bos_token_id=0,
)
"""The text tower of openai/clip-vit-large-patch14."""


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers and the initial temperature (transformers' ``CLIPConfig``). The towers'
    ``projection_dim`` must agree: it is the size of the joint embedding space."""

    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    text_config: CLIPTextConfig = dataclasses.field(default_factory=lambda: CLIP_TEXT_B32)
    logit_scale_init_value: float = 2.6592

    def __post_init__(self):
        v, t = self.vision_config.projection_dim, self.text_config.projection_dim
        if v is None or t is None or v != t:
            raise ValueError(
                f"CLIP needs both projections with one size: visual projection_dim {v}, "
                f"text projection_dim {t}."
            )

    @property
    def projection_dim(self) -> int:
        return self.text_config.projection_dim


class TextEmbeddings(eqx.Module):
    """Token plus position embeddings: ids ``(*b, t) -> (*b, t, d)``."""

    token_embedding: eqx.nn.Embedding
    position_embedding: eqx.nn.Embedding

    def __init__(self, config: CLIPTextConfig, key: PRNGKeyArray):
        tkey, pkey = jax.random.split(key)
        d = config.hidden_size
        self.token_embedding = eqx.nn.Embedding(config.vocab_size, d, key=tkey)
        self.position_embedding = eqx.nn.Embedding(config.max_position_embeddings, d, key=pkey)

    def __call__(self, input_ids: Int[Array, "*b t"]) -> Float[Array, "*b t d"]:
        """Float32 at least: token ids carry no compute dtype, and a tower stored in
        bfloat16 (``eqxtl.quantize``) computes in float32 as the image tower does."""
        t = input_ids.shape[-1]
        h = self.token_embedding.weight[input_ids] + self.position_embedding.weight[:t]
        return h.astype(jnp.promote_types(h.dtype, jnp.float32))


def _run_causal(layer: EncoderLayer, h: Array) -> Array:
    return layer(h, causal=True)


class CLIPText(eqx.Module):
    """CLIP's text transformer: token ids ``(t,)`` -> pooled features ``(hidden,)``.

    ``features`` equal transformers' ``pooler_output`` (``final_layer_norm`` of the pooled
    token, see ``CLIPTextConfig.eos_token_id``); ``project(features)`` equals
    ``text_embeds`` of ``CLIPTextModelWithProjection``. Takes a batch ``(B, t)`` directly.
    Padding after ``<|endoftext|>`` cannot reach the pooled token (causal mask), so no
    attention mask is needed for the features.
    """

    batch_native = True  # a class attribute, not a field

    embeddings: TextEmbeddings
    encoder: Encoder
    final_layer_norm: LayerNorm
    text_projection: eqx.nn.Linear | None
    config: CLIPTextConfig = eqx.field(static=True)

    def __init__(self, config: CLIPTextConfig, *, key: PRNGKeyArray):
        ekey, nkey, pkey = jax.random.split(key, 3)
        d = config.hidden_size
        self.embeddings = TextEmbeddings(config, ekey)
        self.encoder = Encoder(config, nkey)  # the vision tower's blocks, run causally
        self.final_layer_norm = LayerNorm(d, config.layer_norm_eps)
        self.text_projection = (
            None
            if config.projection_dim is None
            else _linear(d, config.projection_dim, pkey, use_bias=False)
        )
        self.config = config

    def _check(self, input_ids) -> None:
        c = self.config
        shape = getattr(input_ids, "shape", None)
        dtype = getattr(input_ids, "dtype", None)
        if shape is None or len(shape) not in (1, 2) or not jnp.issubdtype(dtype, jnp.integer):
            raise DataError(
                f"CLIPText expects integer token ids of shape (t,) or (B, t) (from "
                f"eqxtl.Tokenizer), got {dtype} {shape}."
            )
        if not 1 <= shape[-1] <= c.max_position_embeddings:
            raise DataError(
                f"{shape[-1]} tokens per text; this text tower takes 1 to "
                f"{c.max_position_embeddings} (tokenize with context_length="
                f"{c.max_position_embeddings})."
            )
        if isinstance(input_ids, jax.core.Tracer):  # under jit: values unknown, see zero_shot_head
            return
        ids = np.asarray(input_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= c.vocab_size):
            bad = int(ids.max()) if ids.max() >= c.vocab_size else int(ids.min())
            raise DataError(
                f"input_ids holds token id {bad}, but this text tower has {c.vocab_size} token "
                f"embeddings (ids 0..{c.vocab_size - 1}): the tokenizer is another model's. "
                "Tokenize with the model's own (eqxtl.Tokenizer.from_pretrained(<its source>))."
            )

    def hidden_states(self, input_ids: Int[Array, "*b t"]) -> Float[Array, "*b t d"]:
        """transformers' ``last_hidden_state``: every token after the last block and
        ``final_layer_norm``."""
        self._check(input_ids)
        h = self.embeddings(input_ids)
        enc = self.encoder
        h = run_blocks(_run_causal, enc.layers, h, scan=enc.scan, remat=enc.remat)
        return self.final_layer_norm(h)

    def pooled_index(self, input_ids: Int[Array, "*b t"]) -> Int[Array, "*b"]:
        """The position pooled from each text (transformers 5's rule for this config)."""
        if self.config.eos_token_id == 2:
            return jnp.argmax(input_ids, axis=-1)  # legacy: the largest id (first if tied)
        return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)

    def __call__(
        self, input_ids: Int[Array, "*b t"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*b d"]:
        """Pooled features ``(*b, hidden)`` (transformers' ``pooler_output``)."""
        del key  # no dropout
        h = self.hidden_states(input_ids)
        index = self.pooled_index(input_ids)
        return jnp.take_along_axis(h, index[..., None, None], axis=-2)[..., 0, :]

    def project(self, features: Float[Array, "*b d"]) -> Float[Array, "*b p"]:
        """``text_projection(features)``: the text embedding of CLIP's joint space."""
        if self.text_projection is None:
            raise ValueError(
                "This text tower has no text_projection (projection_dim=None): it was loaded "
                "from a CLIPTextModel checkpoint. Load a CLIPModel or "
                "CLIPTextModelWithProjection checkpoint to project."
            )
        return _dense(self.text_projection, features)


def _normalized(x: Float[Array, "*b p"]) -> Float[Array, "*b p"]:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIP(eqx.Module):
    """Both CLIP towers and the temperature: images and texts -> similarity logits.

    ``logits(images (B, 3, H, W), input_ids (T, 77)) -> (B, T)`` equals transformers'
    ``CLIPModel(...).logits_per_image``: cosine similarity of the projected embeddings
    times ``exp(logit_scale)``. ``encode_image`` / ``encode_text`` give the unnormalised
    projected embeddings (``get_image_features`` / ``get_text_features``).
    """

    vision_model: CLIPVision
    text_model: CLIPText
    logit_scale: Float[Array, ""]
    config: CLIPConfig = eqx.field(static=True)

    def __init__(self, config: CLIPConfig, *, key: PRNGKeyArray):
        vkey, tkey = jax.random.split(key)
        self.vision_model = CLIPVision(config.vision_config, key=vkey)
        self.text_model = CLIPText(config.text_config, key=tkey)
        self.logit_scale = jnp.asarray(config.logit_scale_init_value, jnp.float32)
        self.config = config

    def encode_image(self, images: Float[Array, "*b c h w"]) -> Float[Array, "*b p"]:
        """Image embeddings ``(*b, projection_dim)``, not normalised."""
        features, _ = self.vision_model(images, None)
        return self.vision_model.project(features)

    def encode_text(self, input_ids: Int[Array, "*t n"]) -> Float[Array, "*t p"]:
        """Text embeddings ``(*t, projection_dim)``, not normalised."""
        return self.text_model.project(self.text_model(input_ids))

    def logits(
        self, images: Float[Array, "b c h w"], input_ids: Int[Array, "t n"]
    ) -> Float[Array, "b t"]:
        """transformers' ``logits_per_image`` ``(B, T)``; ``.T`` is ``logits_per_text``."""
        image = _normalized(self.encode_image(images))
        text = _normalized(self.encode_text(input_ids)).astype(image.dtype)
        return image @ text.T * jnp.exp(self.logit_scale).astype(image.dtype)

    def __call__(
        self, images: Float[Array, "b c h w"], input_ids: Int[Array, "t n"]
    ) -> Float[Array, "b t"]:
        """``logits(images, input_ids)``."""
        return self.logits(images, input_ids)


# --------------------------------------------------------------------------------------
# Loading: transformers CLIPModel and open_clip CLIP checkpoints
# --------------------------------------------------------------------------------------

# transformers' CLIPModel: the paths of `CLIP`, except that each projection sits at the top.
_TRANSFORMERS_KEYS = KeyMap(
    (
        Drop(r"(text_model|vision_model)\.embeddings\.position_ids"),
        # the projections first: on save, the first rule that matches a canonical name wins
        Map("visual_projection", "vision_model.visual_projection"),
        Map("text_projection", "text_model.text_projection"),
        Map("vision_model", "vision_model"),
        Map("text_model", "text_model"),
        Map("logit_scale", "logit_scale"),
    )
)


def _vision_rules(keys: KeyMap, prefix: str = "vision_model.") -> list[Map]:
    """The vision layout's own rules (``clip.py``) with the canonical side under ``prefix``;
    its ``Drop``s of the text tower and its classifier rule left out."""
    out = []
    for rule in keys.rules:
        if isinstance(rule, Map) and not rule.ours_tuple[0].startswith("head"):
            ours = tuple(prefix + o for o in rule.ours_tuple)
            out.append(Map(rule.theirs, ours if len(ours) > 1 else ours[0], rule.op, rule.save))
    return out


_T = "text_model.encoder.layers.{i}"
# open_clip's CLIP: `visual.*` plus the text tower at the top level, q/k/v packed,
# `text_projection (D, E)` transposed against transformers' `(E, D)`.
_OPEN_CLIP_KEYS = KeyMap(
    (
        *_vision_rules(CLIP_VISION.layout("open_clip").keys),
        Map("token_embedding", "text_model.embeddings.token_embedding"),
        Map("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        Map(
            "transformer.resblocks.{i}.attn.in_proj_weight",
            tuple(f"{_T}.self_attn.{p}_proj.weight" for p in "qkv"),
            SPLIT3,
        ),
        Map(
            "transformer.resblocks.{i}.attn.in_proj_bias",
            tuple(f"{_T}.self_attn.{p}_proj.bias" for p in "qkv"),
            SPLIT3,
        ),
        Map("transformer.resblocks.{i}.attn.out_proj", f"{_T}.self_attn.out_proj"),
        Map("transformer.resblocks.{i}.ln_1", f"{_T}.layer_norm1"),
        Map("transformer.resblocks.{i}.ln_2", f"{_T}.layer_norm2"),
        Map("transformer.resblocks.{i}.mlp.c_fc", f"{_T}.mlp.fc1"),
        Map("transformer.resblocks.{i}.mlp.c_proj", f"{_T}.mlp.fc2"),
        Map("ln_final", "text_model.final_layer_norm"),
        Map("text_projection", "text_model.text_projection.weight", TRANSPOSE),
        Map("logit_scale", "logit_scale"),
        Drop("attn_mask"),
    )
)


def _layers(shapes: Mapping[str, tuple], prefix: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _text_config_from_shapes(shapes: Mapping[str, tuple], **fields) -> CLIPTextConfig:
    """Text config from canonical ``text_model.*`` shapes; ``num_attention_heads =
    hidden_size // 64`` (every openai CLIP text tower) unless ``fields`` say otherwise."""
    t = "text_model."
    try:
        vocab, hidden = shapes[t + "embeddings.token_embedding.weight"]
        positions = shapes[t + "embeddings.position_embedding.weight"][0]
        intermediate = shapes[t + "encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"Cannot infer the CLIP text config: no {e.args[0]!r}.") from None
    projection = shapes.get(t + "text_projection.weight")
    values = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=_layers(shapes, t + "encoder.layers."),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=positions,
        projection_dim=None if projection is None else projection[0],
    )
    return CLIPTextConfig(**{**values, **fields})


def _text_config_from_hf(hf: Mapping[str, Any]) -> CLIPTextConfig:
    """From a ``clip`` config.json (its ``text_config``); missing fields take transformers'
    ``CLIPTextConfig`` defaults, as transformers does."""
    text = hf.get("text_config") or hf.get("text_config_dict") or {}
    d = CLIPTextConfig()
    fields = {f.name for f in dataclasses.fields(CLIPTextConfig)} - {"projection_dim"}
    values = {name: text.get(name, getattr(d, name)) for name in fields}
    return CLIPTextConfig(**values, projection_dim=hf.get("projection_dim", 512))


_OPEN_CLIP_UNSUPPORTED = (
    "hf_model_name",
    "ls_init_value",
    "embed_cls",
    "no_causal_mask",
    "final_ln_after_pool",
    "proj_bias",
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
)


def _open_clip_text_config(oc: Mapping[str, Any], shapes, hidden_act: str) -> CLIPTextConfig:
    """From ``open_clip_config.json``'s ``model_cfg.text_cfg``. open_clip pools the largest
    token id by default (``pool_type="argmax"``): transformers' legacy rule,
    ``eos_token_id=2``."""
    text = oc.get("model_cfg", oc).get("text_cfg") or {}
    unsupported = {k: text[k] for k in _OPEN_CLIP_UNSUPPORTED if text.get(k)}
    pool = text.get("pool_type", "argmax")
    if pool not in ("argmax", "eos") or (pool == "eos" and text.get("eos_id", 2) == 2):
        unsupported["pool_type"] = pool
    if text.get("proj_type", "linear") != "linear":
        unsupported["proj_type"] = text["proj_type"]
    if unsupported:
        raise CheckpointError(
            f"open_clip_config.json describes a text tower eqxtl does not build "
            f"({unsupported}); eqxtl reads open_clip's plain causal text transformer."
        )
    width = int(text.get("width", 512))
    eos = 2 if pool == "argmax" else int(text["eos_id"])
    return _text_config_from_shapes(
        shapes,
        num_attention_heads=int(text.get("heads", max(1, width // 64))),
        hidden_act=hidden_act,
        eos_token_id=eos,
        pad_token_id=int(text.get("pad_id", 0)),
    )


def config_of(
    layout: str, shapes: Mapping[str, tuple], meta: Mapping[str, Mapping[str, Any]]
) -> CLIPConfig:
    """The ``CLIPConfig`` of a checkpoint from its canonical ``shapes`` and the config files
    beside it (``meta``: ``{file name: JSON}``); inferred from the shapes where they say
    nothing (then ``hidden_act`` takes the layout's default, with a warning)."""
    vision_arch_layout = CLIP_VISION.layout(layout)
    prefix = "vision_model."
    vision_shapes = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    vision = vision_arch_layout.read_config(meta, vision_shapes)
    if vision is None:
        vision = CLIP_VISION.infer_config(vision_shapes)
        for field, value in vision_arch_layout.defaults.items():
            vision = dataclasses.replace(vision, **{field: value})
            warnings.warn(
                f"{field} is not stored in the weights and no config file states it; using "
                f"the {layout} layout's default {value!r}. Pass config=CLIPConfig(...) to "
                "choose.",
                stacklevel=3,
            )
    vision = CLIP_VISION.reconcile(vision, vision_shapes)
    scale = CLIPConfig.logit_scale_init_value
    hf = meta.get("config.json") or {}
    if layout == "transformers" and hf.get("model_type") == "clip":
        text = _text_config_from_hf(hf)
        scale = hf.get("logit_scale_init_value", scale)
    elif layout == "open_clip" and "open_clip_config.json" in meta:
        text = _open_clip_text_config(meta["open_clip_config.json"], shapes, vision.hidden_act)
    else:
        eos = {"eos_token_id": 2} if layout == "open_clip" else {}
        text = _text_config_from_shapes(shapes, hidden_act=vision.hidden_act, **eos)
    return CLIPConfig(vision, text, scale)


def _transformers_config(meta: Meta, shapes: Shapes) -> CLIPConfig:
    model_type = (meta.get("config.json") or {}).get("model_type")
    if model_type not in (None, "clip"):
        raise CheckpointError(
            f"config.json model_type {model_type!r} is not a two-tower CLIP ('clip')."
        )
    return config_of("transformers", shapes, meta)


def _transformers_write(config: CLIPConfig, extra: dict) -> dict[str, dict]:
    vision = CLIP_VISION.layout("transformers").write_config(config.vision_config, extra)
    return transformers_write(
        "clip",
        "CLIPModel",
        config,
        extra,
        skip=("vision_config", "text_config"),
        num_labels=False,
        projection_dim=config.projection_dim,
        vision_config=vision["config.json"],
        text_config={"model_type": "clip_text_model", **dataclasses.asdict(config.text_config)},
    )


def _open_clip_write(config: CLIPConfig, extra: dict) -> dict[str, dict]:
    text = config.text_config
    written = CLIP_VISION.layout("open_clip").write_config(config.vision_config, extra)
    oc = written["open_clip_config.json"]
    text_cfg = {
        "context_length": text.max_position_embeddings,
        "vocab_size": text.vocab_size,
        "width": text.hidden_size,
        "heads": text.num_attention_heads,
        "layers": text.num_hidden_layers,
        "mlp_ratio": text.intermediate_size / text.hidden_size,
    }
    if text.eos_token_id != 2:
        text_cfg.update(pool_type="eos", eos_id=text.eos_token_id)
    oc["model_cfg"]["text_cfg"] = text_cfg
    return {"open_clip_config.json": oc}


def _check_towers(keys: KeyMap) -> Callable[[Mapping[str, Any]], None]:
    """``Layout.check``: both towers, the visual projection and the temperature present."""

    def check(tensors: Mapping[str, Any]) -> None:
        names = keys.plan(list(tensors)).recipes
        if not any(n.startswith("text_model.") for n in names):
            raise CheckpointError(
                "This checkpoint holds no text tower (no text weights): it is a vision-only "
                "checkpoint. Load it with towers='vision', or use a full CLIP checkpoint "
                "(transformers CLIPModel, e.g. openai/clip-vit-base-patch32, or open_clip)."
            )
        if "vision_model.visual_projection.weight" not in names or "logit_scale" not in names:
            raise CheckpointError(
                "This checkpoint has a text tower but no visual projection or logit_scale: "
                "towers='both' needs a full CLIP checkpoint."
            )

    return check


def _infer_config(shapes: Shapes) -> CLIPConfig:
    return config_of("transformers", shapes, {})


CLIP_MODEL = Architecture(
    name="clip",
    config_cls=CLIPConfig,
    build=lambda config, key: CLIP(config, key=key),
    layouts=(
        Layout(
            "transformers",
            _TRANSFORMERS_KEYS,
            signature=(r"(vision_model\.)?embeddings\.class_embedding",),
            claims=claims_transformers("clip"),
            read_config=_transformers_config,
            write_config=_transformers_write,
            check=_check_towers(_TRANSFORMERS_KEYS),
        ),
        Layout(
            "open_clip",
            _OPEN_CLIP_KEYS,
            signature=(r"visual\.class_embedding",),
            claims=lambda meta: "open_clip_config.json" in meta,
            read_config=lambda meta, shapes: config_of("open_clip", shapes, meta),
            write_config=_open_clip_write,
            check=_check_towers(_OPEN_CLIP_KEYS),
            weights_file=OPEN_CLIP_FILES[0],
            files=OPEN_CLIP_FILES,
            config_files=("open_clip_config.json",),
        ),
    ),
    infer_config=_infer_config,
    feature_dim=lambda config: config.projection_dim,
    preprocessing=lambda config: CLIP_VISION.preprocessing(config.vision_config),
    # the vision tower's blocks: what last_blocks / layer-wise decay count (forward order)
    blocks=r"vision_model\.encoder\.layers\.\d+",
    norm_types=CLIP_VISION.norm_types,
    linear_types=CLIP_VISION.linear_types,
    towers="both",
    supports_remat=True,
    supports_scan=True,
)
"""Both CLIP towers (``from_pretrained(..., towers="both")``): transformers' ``CLIPModel``
or open_clip's ``CLIP``. The text tower's config comes from the config file beside the
weights, else from the shapes (``hidden_act`` as the vision tower's)."""


def clip_state_dict(clip: CLIP, layout: str = "transformers") -> dict[str, np.ndarray]:
    """Every weight of ``clip`` under its key in ``layout``: transformers' ``CLIPModel``
    (what ``CLIPModel.load_state_dict`` takes, ``position_ids`` aside) or open_clip's
    ``CLIP`` (``attn_mask`` aside)."""
    flat = jax.tree_util.tree_flatten_with_path(clip)[0]
    tensors = {keypath_to_str(kp): np.asarray(leaf) for kp, leaf in flat if eqx.is_array(leaf)}
    return CLIP_MODEL.layout(layout).keys.save(tensors)
