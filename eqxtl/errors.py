"""One error hierarchy for everything eqxtl raises on bad input.

Every class is a ``ValueError`` too (code written against earlier versions keeps catching
it), and every message says what was wrong and what to do.

```
EqxtlError
├── CheckpointError          weights that cannot be read or do not fit the model
│   ├── TorchFileError       a PyTorch file the restricted reader cannot read
│   │   └── UnsafeCheckpointError   a pickle that asks to run code (never executed)
│   └── LayoutError          a checkpoint whose key layout eqxtl does not recognise
├── SourceError              a source that cannot be found or fetched
├── RuleError                a filter rule or parameter group that matches nothing
├── DataError                an image, label or dataset that cannot be used
│   └── CorruptImageError    one image file that cannot be decoded
├── AdapterError             a LoRA/DoRA operation on a model in the wrong state
├── OptimizerMismatchError   an optimizer that does not fit the trainable half
└── TrainingError            a run that cannot go on (non-finite loss, a locked run folder)
```
"""

from __future__ import annotations


class EqxtlError(ValueError):
    """Base class of every error eqxtl raises on bad input."""


class CheckpointError(EqxtlError):
    """A checkpoint cannot be read, or does not fit the model (missing, unexpected or
    misshaped keys, an unknown layout, a config that contradicts the weights)."""


class TorchFileError(CheckpointError):
    """A PyTorch file (``.pth`` / ``.bin`` / ``.pt``) that the restricted reader cannot read."""


class UnsafeCheckpointError(TorchFileError):
    """A pickle that asks to import or call something other than tensors and plain
    containers. Nothing in it was executed."""


class LayoutError(CheckpointError):
    """A checkpoint whose key layout no architecture recognises."""


class SourceError(EqxtlError):
    """A checkpoint source that cannot be found or fetched; the message says what to do."""


class RuleError(EqxtlError):
    """A filter rule or parameter group that is malformed or matches nothing."""


class DataError(EqxtlError):
    """An image, a label, a source or a dataset cannot be used as given (the message says
    why and what to do)."""


class CorruptImageError(DataError):
    """One image file could not be decoded. The ``Loader`` masks such an example out (and
    warns) instead of stopping a training run."""


class AdapterError(EqxtlError):
    """A LoRA/DoRA request that cannot be done: a rank out of range, adapters added to an
    already-adapted layer, merging a model that has no adapters (already merged?)."""


class OptimizerMismatchError(EqxtlError):
    """An optimizer (or its state) that does not fit the model's trainable half."""


class TrainingError(EqxtlError):
    """A training run that cannot go on: a non-finite loss or gradient, a run folder in use
    by another run, a resume that does not match the stored run."""
