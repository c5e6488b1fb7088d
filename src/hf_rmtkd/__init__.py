"""hf_rmtkd: RMT-KD compression for Hugging Face models.

Keeps the eigen-directions of hidden-activation covariances that rise above the Marchenko–Pastur bulk, shrinks each
layer to that many directions, and restores accuracy by self-distillation (Ettori et al., arXiv 2509.15724).

Importing the package registers the RMTKD config and model classes with the transformers Auto classes, so
``AutoModelForSequenceClassification.from_pretrained("out/")`` loads a compressed checkpoint with no extra flag.
"""

from . import spectrum
from .api import analyze, compress
from .batchnorm_folding import fold_batchnorm
from .checkpoint import save_rmtkd_checkpoint
from .embedding_folding import fold_embeddings
from .hub import install_push_to_hub, push_model
from .modeling import (
    RMTKDConfig,
    RMTKDForCausalLM,
    RMTKDForImageClassification,
    RMTKDForMaskedLM,
    RMTKDForSequenceClassification,
    RMTKDForTokenClassification,
    RMTKDModel,
    register_auto_classes,
)
from .report import SiteSpectrum, SpectralReport
from .trainer import RMTKDTrainer
from .training_args import RMTKDTrainingArguments

__version__ = "0.1.0"

register_auto_classes()
install_push_to_hub()

__all__ = [
    "RMTKDConfig",
    "RMTKDForCausalLM",
    "RMTKDForImageClassification",
    "RMTKDForMaskedLM",
    "RMTKDForSequenceClassification",
    "RMTKDForTokenClassification",
    "RMTKDModel",
    "RMTKDTrainer",
    "RMTKDTrainingArguments",
    "SiteSpectrum",
    "SpectralReport",
    "analyze",
    "compress",
    "fold_batchnorm",
    "fold_embeddings",
    "push_model",
    "save_rmtkd_checkpoint",
    "spectrum",
]
