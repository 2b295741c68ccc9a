"""eqxtl: transfer learning in JAX with Equinox.

Pretrained backbones loaded by name, freezing as data (filter specs from path rules),
per-group optimizers over the trainable half only, and a compiled train step that
differentiates only what trains.
"""

from ._paths import paths as paths
from ._torch_pickle import TorchLimits as TorchLimits
from .adapters import ADAPTER_RULE as ADAPTER_RULE
from .adapters import adapter_targets as adapter_targets
from .adapters import has_adapters as has_adapters
from .adapters import load_adapter as load_adapter
from .adapters import lora as lora
from .adapters import lora_spec as lora_spec
from .adapters import merge_lora as merge_lora
from .adapters import save_adapter as save_adapter
from .adapters import unmerge_lora as unmerge_lora
from .checkpoint import state_dict as state_dict
from .data import ArraySource as ArraySource
from .data import Augment as Augment
from .data import ImageFolder as ImageFolder
from .data import Loader as Loader
from .data import Preprocessing as Preprocessing
from .data import Subset as Subset
from .data import TFDSSource as TFDSSource
from .data import check_labels as check_labels
from .data import check_same_classes as check_same_classes
from .data import preprocess as preprocess
from .data import split as split
from .errors import AdapterError as AdapterError
from .errors import CheckpointError as CheckpointError
from .errors import CorruptImageError as CorruptImageError
from .errors import DataError as DataError
from .errors import EqxtlError as EqxtlError
from .errors import LayoutError as LayoutError
from .errors import OptimizerMismatchError as OptimizerMismatchError
from .errors import RuleError as RuleError
from .errors import SourceError as SourceError
from .errors import TorchFileError as TorchFileError
from .errors import TrainingError as TrainingError
from .errors import UnsafeCheckpointError as UnsafeCheckpointError
from .features import FeatureLoader as FeatureLoader
from .features import Features as Features
from .features import extract_features as extract_features
from .filters import count as count
from .filters import everything as everything
from .filters import frozen as frozen
from .filters import summary as summary
from .filters import trainable as trainable
from .fit import FitResult as FitResult
from .fit import evaluate as evaluate
from .fit import fit as fit
from .fit import predict as predict
from .fit import warmup_cosine as warmup_cosine
from .models.clip import PREPROCESSING as CLIP_PREPROCESSING  # noqa: F401
from .models.clip_text import CLIP as CLIP
from .models.clip_text import CLIPConfig as CLIPConfig
from .models.clip_text import CLIPText as CLIPText
from .models.clip_text import CLIPTextConfig as CLIPTextConfig
from .models.dinov2 import Dinov2 as Dinov2
from .models.dinov2 import Dinov2Config as Dinov2Config
from .models.efficientnet import PREPROCESSING as LITE0_PREPROCESSING  # noqa: F401
from .models.heads import IMAGENET_TEMPLATES as IMAGENET_TEMPLATES
from .models.heads import IMAGENET_TEMPLATES_7 as IMAGENET_TEMPLATES_7
from .models.heads import Classifier as Classifier
from .models.heads import feature_dim as feature_dim
from .models.heads import zero_shot_head as zero_shot_head
from .models.layers import BatchNorm as BatchNorm
from .models.layers import Conv2d as Conv2d
from .models.layers import LoRAConv2d as LoRAConv2d
from .models.layers import LoRALinear as LoRALinear
from .models.mixer import MixerConfig as MixerConfig
from .models.mixer import MLPMixer as MLPMixer
from .models.registry import ARCHITECTURES as ARCHITECTURES
from .models.registry import REGISTRY as REGISTRY
from .models.registry import preprocessing_for as preprocessing_for
from .models.resnet import PREPROCESSING as IMAGENET_PREPROCESSING  # noqa: F401
from .models.siglip import SiglipVision as SiglipVision
from .models.siglip import SiglipVisionConfig as SiglipVisionConfig
from .models.vit import ViT as ViT
from .models.vit import ViTConfig as ViTConfig
from .optim import blocks as blocks
from .optim import decay_mask as decay_mask
from .optim import last_blocks as last_blocks
from .optim import layer_depths as layer_depths
from .optim import layerwise_groups as layerwise_groups
from .optim import param_groups as param_groups
from .parallel import data_mesh as data_mesh
from .parallel import replicate as replicate
from .parallel import shard_batch as shard_batch
from .pretrained import from_config as from_config
from .pretrained import from_pretrained as from_pretrained
from .pretrained import save_pretrained as save_pretrained
from .remat import with_remat as with_remat
from .robust import interpolate as interpolate
from .robust import lp_ft as lp_ft
from .robust import wise_ft as wise_ft
from .tokenizer import Tokenizer as Tokenizer
from .train import batched as batched
from .train import batchnorm_modes as batchnorm_modes
from .train import classification_loss as classification_loss
from .train import cross_entropy as cross_entropy
from .train import make_eval_step as make_eval_step
from .train import make_step as make_step

__version__ = "0.1.0"
