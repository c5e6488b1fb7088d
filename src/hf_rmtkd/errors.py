"""The exceptions hf_rmtkd raises, in one place (each is also a ``ValueError`` or ``KeyError`` for plain handlers).

- `NonFiniteActivationError`: NaN or Inf reached a calibration site (the message names the site).
- `ModulePathError`: a reduction map or target names a module the model lacks, or one of the wrong type.
- `CheckpointMismatchError`: a checkpoint's tensors are missing, unexpected, misshaped or unreadable.
"""

from .modeling.layers_rmtkd import ModulePathError
from .modeling.modeling_rmtkd import CheckpointMismatchError
from .spectrum import NonFiniteActivationError

__all__ = ["CheckpointMismatchError", "ModulePathError", "NonFiniteActivationError"]
