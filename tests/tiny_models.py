"""Tiny random models built from configs in code (offline, seeded, each well under 0.5M parameters).

``tiny_model(arch, head)`` for arch in :data:`ARCHS` and head in :data:`HEADS`; ``tiny_inputs(arch)`` gives a batch
the model accepts; ``site_statistics(model, path, inputs, kind)`` measures the covariance spectrum of a reduction site
the way calibration does (float64, every token / pixel a sample), for tests that need a site's statistics.
"""

from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

ARCHS = ("bert", "roberta", "distilbert", "vit", "resnet", "llama")
TEXT_ARCHS = ("bert", "roberta", "distilbert", "llama")

HEADS = {
    "base": AutoModel,
    "sequence_classification": AutoModelForSequenceClassification,
    "token_classification": AutoModelForTokenClassification,
    "masked_lm": AutoModelForMaskedLM,
    "causal_lm": AutoModelForCausalLM,
    "image_classification": AutoModelForImageClassification,
}

DEFAULT_HEAD = {
    "bert": "sequence_classification",
    "roberta": "sequence_classification",
    "distilbert": "sequence_classification",
    "vit": "image_classification",
    "resnet": "image_classification",
    "llama": "causal_lm",
}

VOCAB_SIZE = 128
IMAGE_SIZE = 16

# Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's waiting threads make every
# small op an order of magnitude slower.
torch.set_num_threads(1)


def tiny_config(arch: str, **overrides) -> transformers.PreTrainedConfig:
    """A tiny config of ``arch``; ``overrides`` replace any field (e.g. ``initializer_range``, ``num_labels``)."""
    text = {"vocab_size": VOCAB_SIZE, "max_position_embeddings": 64}
    fields = {
        "bert": dict(text, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        "roberta": dict(text, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        "distilbert": dict(text, dim=32, n_layers=2, n_heads=4, hidden_dim=64),
        "vit": dict(
            image_size=IMAGE_SIZE,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        "resnet": dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck"),
        "llama": dict(
            text,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
    }[arch]
    fields.update(num_labels=3)
    fields.update(overrides)
    return transformers.AutoConfig.for_model(arch, **fields)


def tiny_model(arch: str, head: str | None = None, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A seeded tiny random ``arch`` model with ``head`` (default: the usual head for that arch), in eval mode."""
    head = head or DEFAULT_HEAD[arch]
    torch.manual_seed(seed)
    return HEADS[head].from_config(tiny_config(arch, **overrides)).eval()


def tiny_inputs(arch: str, batch: int = 4, seq_len: int = 8, seed: int = 1) -> dict:
    """A batch of random inputs for ``arch``: token ids (no padding) or images."""
    generator = torch.Generator().manual_seed(seed)
    if arch in TEXT_ARCHS:
        # Ids from 3 on, so no sample is a special (pad) token.
        input_ids = torch.randint(3, VOCAB_SIZE, (batch, seq_len), generator=generator)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    return {"pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)}


def tiny_tokenizer(directory) -> transformers.BertTokenizerFast:
    """A real BERT tokenizer over the tiny text models' ids, its vocabulary written to ``directory``:
    [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4, then words."""
    vocab = Path(directory) / "vocab.txt"
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab.write_text("\n".join(special + [f"w{i}" for i in range(len(special), VOCAB_SIZE)]))
    return transformers.BertTokenizerFast(vocab_file=str(vocab))


@torch.no_grad()
def module_io(model: torch.nn.Module, path: str, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of the module at ``path`` during one forward pass of ``inputs`` (its first call)."""
    captured = []
    handle = model.get_submodule(path).register_forward_hook(lambda module, args, out: captured.append((args[0], out)))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return captured[0]


def module_output(model: torch.nn.Module, path: str, inputs: dict) -> torch.Tensor:
    """The output of the module at ``path`` for ``inputs``."""
    return module_io(model, path, inputs)[1]


def site_statistics(model: torch.nn.Module, path: str, inputs: dict, kind: str = "low_rank", centred: bool = True):
    """Spectral statistics of a reduction site, as the surgery functions take them.

    The site is the module's input (``low_rank``, ``ffn_width``: for a conv, channels with every pixel a sample) or
    its output (``embedding``).

    Returns:
        ``{"covariance": (d, d) float64, "mean": (d,) or None, "eigenvalues": (d,) descending,
        "eigenvectors": (d, d) columns in the same order}``.
    """
    x = module_io(model, path, inputs)[1 if kind == "embedding" else 0]
    x = x.movedim(1, -1) if x.ndim == 4 else x  # channels last
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    mean = x.mean(0)
    centred_x = x - mean if centred else x
    covariance = centred_x.T @ centred_x / x.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    return {
        "covariance": covariance,
        "mean": mean if centred else None,
        "eigenvalues": eigenvalues.flip(0),
        "eigenvectors": eigenvectors.flip(1),
    }


def ffn_sites(arch: str, head: str | None = None) -> list[tuple[str, list[str]]]:
    """Every FFN of a tiny ``arch`` model as ``(consumer path, producer paths)``, relative to the model."""
    head = head or DEFAULT_HEAD[arch]
    prefix = {
        "bert": "bert.",
        "roberta": "roberta.",
        "distilbert": "distilbert.",
        "vit": "vit.",
        "resnet": "resnet.",
        "llama": "model.",
    }[arch]
    if head == "base":
        prefix = ""
    if arch in ("bert", "roberta"):
        return [
            (f"{prefix}encoder.layer.{i}.output.dense", [f"{prefix}encoder.layer.{i}.intermediate.dense"])
            for i in range(2)
        ]
    if arch == "distilbert":
        return [
            (f"{prefix}transformer.layer.{i}.ffn.lin2", [f"{prefix}transformer.layer.{i}.ffn.lin1"]) for i in range(2)
        ]
    if arch == "vit":  # transformers 5.x ViT: layers.i.mlp.fc1 -> fc2
        return [(f"{prefix}layers.{i}.mlp.fc2", [f"{prefix}layers.{i}.mlp.fc1"]) for i in range(2)]
    if arch == "llama":
        return [
            (
                f"{prefix}layers.{i}.mlp.down_proj",
                [f"{prefix}layers.{i}.mlp.gate_proj", f"{prefix}layers.{i}.mlp.up_proj"],
            )
            for i in range(2)
        ]
    sites = []  # resnet bottleneck: two inner widths per block
    for stage in range(2):
        block = f"{prefix}encoder.stages.{stage}.layers.0.layer"
        for j in range(2):
            sites.append((f"{block}.{j + 1}.convolution", [f"{block}.{j}.convolution", f"{block}.{j}.normalization"]))
    return sites
