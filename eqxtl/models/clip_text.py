"""CLIP's text tower and the two-tower ``CLIP`` model, with transformers' names.

``CLIPText`` is transformers' ``CLIPTextModelWithProjection`` without the ``text_model.``
prefix: its paths read ``embeddings.token_embedding.weight``,
``encoder.layers.3.self_attn.q_proj.weight``, ``final_layer_norm.weight``,
``text_projection.weight``. ``CLIP`` holds both towers and the temperature; its paths are
those of transformers' ``CLIPModel`` except that each projection sits inside its tower
(``vision_model.visual_projection.weight``, ``text_model.text_projection.weight``), so
loading a ``CLIPModel`` file is renaming (``load_clip``).

Token ids come from ``eqxtl.Tokenizer``: ``(77,)`` per text, or a batch ``(B, 77)``. The
blocks are the vision tower's (``eqxtl.models.clip.EncoderLayer``) with a causal mask; every
matrix product of a batch sees ``B * tokens`` rows (batch-native, like ``CLIPVision``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..errors import CheckpointError, DataError
from ..remat import checkpointed
from .clip import (
    _ACTIVATIONS,
    CLIP_VISION,
    Activation,
    CLIPVision,
    CLIPVisionConfig,
    Encoder,
    EncoderLayer,
    LayerNorm,
    _dense,
    _linear,
)


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
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {_ACTIVATIONS}.")
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
        t = input_ids.shape[-1]
        return self.token_embedding.weight[input_ids] + self.position_embedding.weight[:t]


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

    def hidden_states(self, input_ids: Int[Array, "*b t"]) -> Float[Array, "*b t d"]:
        """transformers' ``last_hidden_state``: every token after the last block and
        ``final_layer_norm``."""
        self._check(input_ids)
        h = self.embeddings(input_ids)
        run = checkpointed(_run_causal, self.encoder.remat)
        for layer in self.encoder.layers:
            h = run(layer, h)
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
# Loading a transformers CLIPModel file
# --------------------------------------------------------------------------------------

_DROPPED = re.compile(r".*position_ids")


def _canonical(key: str) -> str | None:
    """transformers ``CLIPModel`` key -> path in ``CLIP``; None for buffers."""
    if _DROPPED.fullmatch(key):
        return None
    if key == "visual_projection.weight":
        return "vision_model.visual_projection.weight"
    if key == "text_projection.weight":
        return "text_model.text_projection.weight"
    return key


def hf_name(canonical: str) -> str:
    """Path in ``CLIP`` -> transformers ``CLIPModel`` key (the inverse of loading)."""
    for tower, name in (("vision_model.", "visual_projection"), ("text_model.", "text_projection")):
        if canonical == f"{tower}{name}.weight":
            return f"{name}.weight"
    return canonical


def _layers(shapes: Mapping[str, tuple], prefix: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _text_config_from_shapes(shapes: Mapping[str, tuple]) -> CLIPTextConfig:
    """Text config from canonical ``text_model.*`` shapes; ``num_attention_heads =
    hidden_size // 64`` (every openai CLIP text tower), transformers' default token ids."""
    t = "text_model."
    try:
        vocab, hidden = shapes[t + "embeddings.token_embedding.weight"]
        positions = shapes[t + "embeddings.position_embedding.weight"][0]
        intermediate = shapes[t + "encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"Cannot infer the CLIP text config: no {e.args[0]!r}.") from None
    projection = shapes.get(t + "text_projection.weight")
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=_layers(shapes, t + "encoder.layers."),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=positions,
        projection_dim=None if projection is None else projection[0],
    )


def _text_config_from_hf(hf: Mapping[str, Any]) -> CLIPTextConfig:
    """From a ``clip`` config.json (its ``text_config``); missing fields take transformers'
    ``CLIPTextConfig`` defaults, as transformers does."""
    text = hf.get("text_config") or hf.get("text_config_dict") or {}
    d = CLIPTextConfig()
    fields = {f.name for f in dataclasses.fields(CLIPTextConfig)} - {"projection_dim"}
    values = {name: text.get(name, getattr(d, name)) for name in fields}
    return CLIPTextConfig(**values, projection_dim=hf.get("projection_dim", 512))


def config_of(
    shapes: Mapping[str, tuple], hf_config: Mapping[str, Any] | None = None
) -> CLIPConfig:
    """The ``CLIPConfig`` of canonical ``shapes``: from a ``clip`` config.json when given,
    otherwise inferred from the shapes."""
    vision_shapes = {
        k[len("vision_model.") :]: v for k, v in shapes.items() if k.startswith("vision_model.")
    }
    if hf_config is not None:
        vision = CLIP_VISION.reconcile(CLIP_VISION.config_from_hf(hf_config), vision_shapes)
        text = _text_config_from_hf(hf_config)
        scale = hf_config.get("logit_scale_init_value", CLIPConfig.logit_scale_init_value)
        return CLIPConfig(vision, text, scale)
    return CLIPConfig(CLIP_VISION.infer_config(vision_shapes), _text_config_from_shapes(shapes))


def load_clip(
    tensors: Mapping[str, np.ndarray],
    hf_config: Mapping[str, Any] | None = None,
    *,
    config: CLIPConfig | None = None,
    source: str = "checkpoint",
    dtype=None,
) -> tuple[CLIP, eqx.nn.State]:
    """A ``CLIP`` from the tensors of a transformers ``CLIPModel`` file (names strictly
    checked: one ``CheckpointError`` lists every missing, unexpected or misshaped key).

    ``hf_config``: its config.json (``model_type="clip"``), else the config is inferred
    from the shapes (``config`` overrides both). Returns ``(clip, state)`` in inference mode
    (``state`` is empty: CLIP has no BatchNorm).
    """
    from .. import checkpoint  # the generic loader sits above models/ in the import graph

    names: dict[str, str] = {}
    for key in tensors:
        name = _canonical(key)
        if name is not None:
            names[name] = key
    if not any(n.startswith("text_model.") for n in names):
        raise CheckpointError(
            f"{source} holds no text tower (no text_model.* weights): it is a vision-only "
            "checkpoint. Load it with towers='vision', or use a full CLIPModel checkpoint "
            "(e.g. openai/clip-vit-base-patch32)."
        )
    if "vision_model.visual_projection.weight" not in names or "logit_scale" not in names:
        raise CheckpointError(
            f"{source} has a text tower but no visual_projection.weight or logit_scale: "
            "towers='both' needs a full transformers CLIPModel file."
        )
    shape_of = getattr(tensors, "shape", None)
    shapes = {
        n: tuple(shape_of(k)) if shape_of else tuple(np.shape(tensors[k])) for n, k in names.items()
    }
    if config is None:
        if hf_config is not None and hf_config.get("model_type") not in (None, "clip"):
            raise CheckpointError(
                f"{source}: config.json model_type {hf_config.get('model_type')!r} is not a "
                "two-tower CLIP ('clip')."
            )
        config = config_of(shapes, hf_config)
    skeleton = eqx.filter_eval_shape(CLIP, config, key=jax.random.key(0))
    renamed = _Lazy(tensors, names)
    return checkpoint.fill(skeleton, renamed, source=source, dtype=dtype)


class _Lazy(Mapping):
    """``path -> tensor`` over ``tensors`` without reading any until asked."""

    def __init__(self, tensors: Mapping[str, np.ndarray], names: dict[str, str]):
        self._tensors, self._names = tensors, names

    def __getitem__(self, name: str) -> np.ndarray:
        return self._tensors[self._names[name]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._names


def clip_state_dict(clip: CLIP) -> dict[str, np.ndarray]:
    """Every weight of ``clip`` under its transformers ``CLIPModel`` key (what
    ``CLIPModel.load_state_dict`` takes, ``position_ids`` aside)."""
    from ..checkpoint import state_dict

    return {hf_name(n): np.asarray(v) for n, v in state_dict(clip).items()}
