"""Zero-shot heads: a ``Classifier`` whose head is the text tower's embedding of prompts."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..errors import DataError
from ..io.tokenizer import Tokenizer
from ..models.heads import Classifier


def _templates(name: str) -> tuple[str, ...]:
    import importlib.resources
    import json

    text = importlib.resources.files(__package__).joinpath("clip_templates.json")
    text = text.read_text("utf-8")
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
    seen: set[str] = set()
    repeated = [c for c in class_names if c in seen or seen.add(c)]
    if repeated:
        raise DataError(
            f"class_names repeats {repeated[0]!r}: two identical rows, so one of them can "
            "never be predicted. Give each class one distinct name."
        )
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
    model,
    class_names: Sequence[str],
    *,
    tokenizer,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    batch_size: int = 256,
) -> Classifier:
    """CLIP's zero-shot classifier as a trainable ``Classifier`` on ``model.vision_model``.

    The head's row for each class is the L2-normalised mean over ``templates`` of the
    L2-normalised text embeddings of ``template.replace("{}", name)``, times
    ``exp(logit_scale)``; its bias is zero. The classifier projects and normalises the
    image features (``project=True, normalize=True``), so its logits equal
    ``model.logits(images, tokenizer(prompts))`` when each class has one prompt. It trains,
    saves and loads like any ``Classifier``.

    **Arguments:**

    - `model`: a two-tower image-text model, ``eqxtl.models.clip_text.CLIP``
      (``from_pretrained(..., towers="both")``).
    - `class_names`: one name per class, in label order.
    - `tokenizer`: an ``eqxtl.Tokenizer``, or a source for ``Tokenizer.from_pretrained``
      (the checkpoint's folder, hub repo or alias).
    - `templates`: prompts with ``{}`` for the class name; default OpenAI's 80 ImageNet
      templates (``eqxtl.IMAGENET_TEMPLATES``; ``eqxtl.IMAGENET_TEMPLATES_7`` is the short
      list, ``["{}"]`` the bare names).
    - `batch_size`: texts per text-tower call.
    """
    class_names, templates = _check_prompts(class_names, templates)
    _check_model(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_pretrained(tokenizer)
    texts = [t.replace("{}", name) for name in class_names for t in templates]
    ids = tokenizer(texts)
    _check_ids(ids, model)
    encode = eqx.filter_jit(lambda m, x: m.encode_text(x))
    batch_size = min(batch_size, len(ids))  # one compiled shape; no padding of a short list
    chunks = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), 0)])
        chunks.append(np.asarray(encode(model, padded), np.float32)[: len(chunk)])
    emb = np.concatenate(chunks).reshape(len(class_names), len(templates), -1)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    emb = emb.mean(axis=1)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    weight = jnp.asarray(emb) * jnp.exp(model.logit_scale.astype(jnp.float32))
    head = eqx.nn.Linear(weight.shape[1], weight.shape[0], key=jax.random.key(0))
    head = eqx.tree_at(lambda m: (m.weight, m.bias), head, (weight, jnp.zeros(weight.shape[0])))
    return Classifier(
        model.vision_model, head=head, project=True, normalize=True, class_names=class_names
    )


def _check_model(model) -> None:
    missing = [a for a in ("vision_model", "encode_text", "logit_scale") if not hasattr(model, a)]
    if missing:
        raise TypeError(
            f"zero_shot_head: model is a {type(model).__name__}, which has no text tower "
            f"(no {', '.join(missing)}). Load both towers: "
            'eqxtl.from_pretrained(..., towers="both").'
        )


def _check_ids(ids, model) -> None:
    """Token ids the text tower has rows for (a tokenizer of another model gives ids past
    its table, which indexing would silently clamp to the last row)."""
    vocab = model.text_model.config.vocab_size
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise DataError(
            f"zero_shot_head: the tokenizer gives token id {int(ids.max())}, but the model's "
            f"text tower has {vocab} token embeddings (ids 0..{vocab - 1}): the tokenizer is "
            "another model's. Use the model's own, e.g. "
            "tokenizer=<the folder or alias the model came from>."
        )
