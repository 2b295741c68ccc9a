"""Parameter-efficient fine-tuning: LoRA and DoRA adapters as new leaves of the model.

``lora(model, targets, rank=8, key=...)`` wraps every matched linear layer and ungrouped
convolution in a ``LoRALinear`` / ``LoRAConv2d`` whose ``weight`` and ``bias`` keep their
paths, with ``lora_a``, ``lora_b`` (and DoRA's ``lora_magnitude``) beside them:
``backbone.encoder.layers.3.self_attn.q_proj.lora_a``. ``B`` starts at zero, so the
adapted model computes exactly what the plain one did. Then freezing is data as usual:
``lora_spec(model, "head")`` trains the adapters and the head, ``param_groups`` can give
``".*lora_.*"`` its own learning rate.

``merge_lora`` folds the adapters into the weights (a plain model, which ``save_pretrained``
writes); ``unmerge_lora(merged, adapted)`` takes them out again. ``save_adapter`` /
``load_adapter`` write and read Hugging Face PEFT's ``adapter_config.json`` +
``adapter_model.safetensors`` for the transformers model of the same base.

Modules: ``inject`` (finding layers, ``lora``, ``lora_spec``), ``merge`` (``merge_lora``,
``unmerge_lora``), ``peft_files`` (``save_adapter``, ``load_adapter``). The adapted layers
themselves are ``eqxtl.models.layers.low_rank``.
"""

from ...models.layers import has_adapters
from .inject import ADAPTER_RULE, adapter_targets, lora, lora_spec
from .merge import merge_lora, unmerge_lora
from .peft_files import load_adapter, save_adapter

__all__ = [
    "ADAPTER_RULE",
    "adapter_targets",
    "has_adapters",
    "load_adapter",
    "lora",
    "lora_spec",
    "merge_lora",
    "save_adapter",
    "unmerge_lora",
]
