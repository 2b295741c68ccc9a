"""Layers shared by the backbones, by kind: ``conv`` (``Conv2d``, ``max_pool``), ``norm``
(``BatchNorm``, ``LayerNorm``), ``low_rank`` (LoRA/DoRA layers, ``dense``), ``transformer``
(activations, ``PatchEmbedding``, ``MLP``, ``SwiGLU``, attention), ``cnn_activation`` (the
convolutional families' activations) with ``sign_bits`` (a ReLU whose backward pass keeps one
bit per element), ``resample`` (position embeddings), ``drop`` (stochastic depth), ``static``
(static switches: remat / scan flags), ``schedule`` (steering XLA's schedule: an array kept
in one buffer, weight gradients computed first) and ``quantized`` (``Int8Weight``, ``NF4Weight``: a
frozen weight stored as int8 or 4-bit NormalFloat, ``eqxtl.quantize``).

Weights keep PyTorch's layout (conv ``(out, in/groups, kh, kw)``, linear ``(out, in)``), so
loading a checkpoint is renaming only.
"""

from .cnn_activation import CNN_ACTIVATIONS, activate_after_batchnorm
from .conv import Conv2d, Padding, max_pool
from .drop import block_rates, drop_keys, drop_path, linear_rates
from .low_rank import (
    ADAPTED_TYPES,
    LoRAConv2d,
    LoRALinear,
    adapted_layers,
    dense,
    has_adapters,
)
from .norm import BatchNorm, LayerNorm, set_inference
from .resample import image_hw, resample_grid, resample_grid_traced, resample_positions
from .sign_bits import relu_keeping_sign_bits
from .static import checkpointed, replace_static, with_static_flag
from .transformer import (
    ACTIVATIONS,
    MLP,
    PatchEmbedding,
    SwiGLU,
    activation,
    linear,
    multihead_attention,
    split_key,
)

__all__ = [
    "ACTIVATIONS",
    "ADAPTED_TYPES",
    "CNN_ACTIVATIONS",
    "MLP",
    "BatchNorm",
    "Conv2d",
    "LayerNorm",
    "LoRAConv2d",
    "LoRALinear",
    "Padding",
    "PatchEmbedding",
    "SwiGLU",
    "activate_after_batchnorm",
    "activation",
    "adapted_layers",
    "block_rates",
    "checkpointed",
    "dense",
    "drop_keys",
    "drop_path",
    "has_adapters",
    "image_hw",
    "linear",
    "linear_rates",
    "max_pool",
    "multihead_attention",
    "relu_keeping_sign_bits",
    "replace_static",
    "resample_grid",
    "resample_grid_traced",
    "resample_positions",
    "set_inference",
    "split_key",
    "with_static_flag",
]
