"""A backbone with a new head: ``Classifier(backbone, num_classes)``; CLIP's zero-shot head
(``zero_shot_head``) as one."""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ..errors import DataError
from ..tokenizer import Tokenizer
from .layers import dense
from .registry import architecture_of


class Classifier(eqx.Module):
    """``backbone`` followed by a linear ``head``: one image ``(C, H, W)`` -> logits.

    Paths are ``backbone.*`` and ``head.weight`` / ``head.bias``, so filter rules read
    ``"head"`` or ``"backbone.encoder.layers.11"``.
    """

    backbone: eqx.Module
    head: eqx.nn.Linear
    project: bool = eqx.field(static=True, default=False)
    normalize: bool = eqx.field(static=True, default=False)

    def __init__(
        self,
        backbone: eqx.Module,
        num_classes: int | None = None,
        *,
        key: PRNGKeyArray | None = None,
        zero_init: bool = False,
        head: eqx.nn.Linear | None = None,
        project: bool = False,
        normalize: bool = False,
    ):
        """**Arguments:**

        - `backbone`: any eqxtl backbone, ``backbone(x, state) -> (features, state)``.
        - `num_classes`: size of a new head (``key`` required unless ``zero_init``).
        - `zero_init`: start the new head at zero weights and bias (the Flax guide's choice:
          the first logits are uniform, so the loss starts at log(num_classes)).
        - `head`: an existing ``eqx.nn.Linear`` instead (e.g. a pretrained ImageNet head).
        - `project`: the head reads the backbone's projected embedding
          (``backbone.project(features)``: CLIP's joint image-text space) instead of its
          pooled features.
        - `normalize`: the head reads L2-normalised features (after ``project``): with
          both, a head of scaled class text embeddings is CLIP's zero-shot classifier
          (``eqxtl.zero_shot_head``).
        """
        self.backbone = backbone
        self.project = project
        self.normalize = normalize
        if project and not callable(getattr(backbone, "project", None)):
            raise ValueError(
                f"project=True needs a backbone with a projection (.project()), e.g. CLIP's "
                f"vision tower; got {type(backbone).__name__}."
            )
        if head is not None:
            self.head = head
            return
        if num_classes is None or num_classes < 1:
            raise ValueError(f"Classifier needs num_classes >= 1, got {num_classes!r}.")
        if key is None and not zero_init:
            raise ValueError("Classifier needs key= to initialise the head (or zero_init=True).")
        features = backbone.config.projection_dim if project else feature_dim(backbone)
        linear = eqx.nn.Linear(
            features, num_classes, key=key if key is not None else jax.random.key(0)
        )
        if zero_init:
            linear = eqx.tree_at(
                lambda m: (m.weight, m.bias),
                linear,
                (jnp.zeros_like(linear.weight), jnp.zeros_like(linear.bias)),
            )
        self.head = linear

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def __call__(
        self, x: Float[Array, "c h w"], state: eqx.nn.State, *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, " classes"], eqx.nn.State]:
        features, state = self.backbone(x, state, key=key)
        return self.logits(features), state

    def logits(self, features: Float[Array, "*b d"]) -> Float[Array, "*b classes"]:
        """The head on pooled backbone ``features`` (projected and normalised as the flags
        say): what ``self(x)`` gives, from cached features."""
        if self.project:
            features = self.backbone.project(features)
        features = features.astype(self.head.weight.dtype)
        if self.normalize:
            features = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
        # also serves a batch (B, d) when the backbone is batch-native; the head may be a
        # LoRA-adapted linear (eqxtl.lora)
        return dense(self.head, features)

    @property
    def batch_native(self) -> bool:
        """Whether ``self(x (B, C, H, W), state)`` works on a whole batch (see ``batched``)."""
        return getattr(self.backbone, "batch_native", False)


def feature_dim(backbone: eqx.Module) -> int:
    """Size of the pooled features ``backbone`` returns."""
    return architecture_of(backbone).feature_dim(backbone.config)


def _templates(name: str) -> tuple[str, ...]:
    import importlib.resources
    import json

    text = importlib.resources.files("eqxtl").joinpath("clip_templates.json").read_text("utf-8")
    return tuple(json.loads(text)[name])


IMAGENET_TEMPLATES: tuple[str, ...] = _templates("imagenet")
"""OpenAI CLIP's 80 ImageNet prompt templates (``"a bad photo of a {}."``, ...)."""
IMAGENET_TEMPLATES_7: tuple[str, ...] = _templates("imagenet_7")
"""The 7 of them OpenAI CLIP selected as a small ensemble (``"itap of a {}."``, ...)."""


def _check_prompts(class_names, templates) -> tuple[list[str], list[str]]:
    if isinstance(class_names, str) or isinstance(templates, str):
        raise DataError("class_names and templates are lists of strings, not one string.")
    class_names, templates = list(class_names), list(templates)
    if not class_names:
        raise DataError("zero_shot_head needs at least one class name; got an empty list.")
    bad = [c for c in class_names if not isinstance(c, str) or not c.strip()]
    if bad:
        raise DataError(f"Class names must be non-empty strings; got {bad[0]!r}.")
    if not templates:
        raise DataError("zero_shot_head needs at least one template, e.g. ['a photo of a {}.'].")
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise DataError(
            f"Template {bad[0]!r} has no '{{}}' where the class name goes; write e.g. "
            "'a photo of a {}.'."
        )
    return class_names, templates


def zero_shot_head(
    clip,
    class_names: Sequence[str],
    *,
    tokenizer,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    batch_size: int = 256,
) -> Classifier:
    """CLIP's zero-shot classifier as a trainable ``Classifier`` on ``clip.vision_model``.

    The head's row for each class is the L2-normalised mean over ``templates`` of the
    L2-normalised text embeddings of ``template.replace("{}", name)``, times
    ``exp(logit_scale)``; its bias is zero. The classifier projects and normalises the
    image features (``project=True, normalize=True``), so its logits equal
    ``clip.logits(images, tokenizer(prompts))`` when each class has one prompt. It trains,
    saves and loads like any ``Classifier``.

    **Arguments:**

    - `clip`: an ``eqxtl.models.clip_text.CLIP`` (``from_pretrained(..., towers="both")``).
    - `class_names`: one name per class, in label order.
    - `tokenizer`: an ``eqxtl.Tokenizer``, or a source for ``Tokenizer.from_pretrained``
      (the checkpoint's folder, hub repo or alias).
    - `templates`: prompts with ``{}`` for the class name; default OpenAI's 80 ImageNet
      templates (``eqxtl.IMAGENET_TEMPLATES``; ``eqxtl.IMAGENET_TEMPLATES_7`` is the short
      list, ``["{}"]`` the bare names).
    - `batch_size`: texts per text-tower call.
    """
    class_names, templates = _check_prompts(class_names, templates)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_pretrained(tokenizer)
    texts = [t.replace("{}", name) for name in class_names for t in templates]
    ids = tokenizer(texts)
    encode = eqx.filter_jit(lambda model, x: model.encode_text(x))
    batch_size = min(batch_size, len(ids))  # one compiled shape; no padding of a short list
    chunks = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), 0)])
        chunks.append(np.asarray(encode(clip, padded), np.float32)[: len(chunk)])
    emb = np.concatenate(chunks).reshape(len(class_names), len(templates), -1)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    emb = emb.mean(axis=1)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    weight = jnp.asarray(emb) * jnp.exp(clip.logit_scale.astype(jnp.float32))
    head = eqx.nn.Linear(weight.shape[1], weight.shape[0], key=jax.random.key(0))
    head = eqx.tree_at(lambda m: (m.weight, m.bias), head, (weight, jnp.zeros(weight.shape[0])))
    return Classifier(clip.vision_model, head=head, project=True, normalize=True)
