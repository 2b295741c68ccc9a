"""A backbone with a new head: ``Classifier(backbone, num_classes)``."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .layers import dense
from .registry import architecture_of


class Classifier(eqx.Module):
    """``backbone`` followed by a linear ``head``: one image ``(C, H, W)`` -> logits.

    Paths are ``backbone.*`` and ``head.weight`` / ``head.bias``, so filter rules read
    ``"head"`` or ``"backbone.encoder.layers.11"``.
    """

    backbone: eqx.Module
    head: eqx.nn.Linear

    def __init__(
        self,
        backbone: eqx.Module,
        num_classes: int | None = None,
        *,
        key: PRNGKeyArray | None = None,
        zero_init: bool = False,
        head: eqx.nn.Linear | None = None,
    ):
        """**Arguments:**

        - `backbone`: any eqxtl backbone, ``backbone(x, state) -> (features, state)``.
        - `num_classes`: size of a new head (``key`` required unless ``zero_init``).
        - `zero_init`: start the new head at zero weights and bias (the Flax guide's choice:
          the first logits are uniform, so the loss starts at log(num_classes)).
        - `head`: an existing ``eqx.nn.Linear`` instead (e.g. a pretrained ImageNet head).
        """
        self.backbone = backbone
        if head is not None:
            self.head = head
            return
        if num_classes is None or num_classes < 1:
            raise ValueError(f"Classifier needs num_classes >= 1, got {num_classes!r}.")
        if key is None and not zero_init:
            raise ValueError("Classifier needs key= to initialise the head (or zero_init=True).")
        features = feature_dim(backbone)
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
        features = features.astype(self.head.weight.dtype)
        # also serves a batch (B, d) when the backbone is batch-native; the head may be a
        # LoRA-adapted linear (eqxtl.lora)
        return dense(self.head, features), state

    @property
    def batch_native(self) -> bool:
        """Whether ``self(x (B, C, H, W), state)`` works on a whole batch (see ``batched``)."""
        return getattr(self.backbone, "batch_native", False)


def feature_dim(backbone: eqx.Module) -> int:
    """Size of the pooled features ``backbone`` returns."""
    return architecture_of(backbone).feature_dim(backbone.config)
