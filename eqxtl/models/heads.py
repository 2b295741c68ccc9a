"""A backbone with a new head: ``Classifier(backbone, num_classes)``; CLIP's zero-shot head
(``zero_shot_head``) as one."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .layers import dense
from .registry import architecture_of, is_backbone


class Classifier(eqx.Module):
    """``backbone`` followed by a linear ``head``: one image ``(C, H, W)`` -> logits.

    Paths are ``backbone.*`` and ``head.weight`` / ``head.bias``, so filter rules read
    ``"head"`` or ``"backbone.encoder.layers.11"``.
    """

    backbone: eqx.Module
    head: eqx.nn.Linear
    project: bool = eqx.field(static=True, default=False)
    normalize: bool = eqx.field(static=True, default=False)
    class_names: tuple[str, ...] | None = eqx.field(static=True, default=None)
    preprocessing: Any = eqx.field(static=True, default=None)

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
        class_names: tuple[str, ...] | None = None,
        preprocessing: Any = None,
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
        - `class_names`, `preprocessing`: what the head was trained on (``fit`` sets them
          from the training data); ``save_pretrained`` writes them into ``config.json``
          (``id2label``/``label2id``, ``eqxtl.preprocessing``), ``from_pretrained`` reads them
          back, ``predict(..., labels=True)`` names classes with them.
        """
        self.backbone = backbone
        self.project = project
        self.normalize = normalize
        if project and not callable(getattr(backbone, "project", None)):
            raise ValueError(
                f"project=True needs a backbone with a projection (.project()), e.g. CLIP's "
                f"vision tower; got {type(backbone).__name__}."
            )
        self.class_names = None if class_names is None else tuple(str(c) for c in class_names)
        self.preprocessing = preprocessing
        if head is not None:
            self.head = head
            self._check_width(backbone, head, project)
            self._check_names()
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
        self._check_names()

    @staticmethod
    def _check_width(backbone, head, project: bool) -> None:
        if not is_backbone(backbone):  # a user's own module: its width is unknown here
            return
        width = backbone.config.projection_dim if project else feature_dim(backbone)
        if head.weight.shape[-1] != width:
            what = "projected embedding" if project else "pooled features"
            raise ValueError(
                f"The head reads {head.weight.shape[-1]} features but the backbone's {what} "
                f"have {width}: the backbone is not built the way the head was trained (e.g. "
                "another pooling); pass the backbone options the checkpoint was trained with."
            )

    def _check_names(self) -> None:
        if self.class_names is not None and len(self.class_names) != self.head.out_features:
            raise ValueError(
                f"{len(self.class_names)} class names for a head of {self.head.out_features} "
                "classes."
            )

    def with_training_info(self, class_names=None, preprocessing=None) -> Classifier:
        """This classifier with its class names and training preprocessing recorded.

        Class names already recorded (a zero-shot head's, a reloaded checkpoint's) name the
        head's rows: the same names in another order mean that the data's label ``i`` is
        not the head's row ``i``, a ``ValueError``.
        """
        old = self.class_names
        if class_names is not None and old is not None:
            new = tuple(str(c) for c in class_names)
            if new != old and sorted(new) == sorted(old):
                at = next(i for i, (a, b) in enumerate(zip(new, old, strict=True)) if a != b)
                raise ValueError(
                    f"The data's classes are this classifier's in another order (label {at} "
                    f"is {new[at]!r} in the data but row {at} of the head is {old[at]!r}): "
                    "training would teach each row another class. Order the data's classes "
                    "as model.class_names (e.g. class_names= of the source), or build the "
                    "head with the data's order."
                )
        return Classifier(
            self.backbone,
            head=self.head,
            project=self.project,
            normalize=self.normalize,
            class_names=class_names if class_names is not None else self.class_names,
            preprocessing=preprocessing if preprocessing is not None else self.preprocessing,
        )

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
        # The wider of the two: a head stored in bfloat16 (eqxtl.quantize) on float32
        # features still computes float32 logits; a float32 head on a bfloat16 backbone too.
        features = features.astype(jnp.promote_types(features.dtype, self.head.weight.dtype))
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
