"""Stock export: save a width-only RMT-KD model as the plain base architecture (no plugin, no remote code).

When every reduction is an ``ffn_width`` cut to the same width k in every layer, the reduced model *is* the base
architecture with a smaller FFN width (e.g. ``BertConfig(intermediate_size=k)``), which stock transformers loads.
"""

import copy

import torch
from transformers.utils import logging

from .modeling.modeling_rmtkd import RMTKDPreTrainedModel

logger = logging.get_logger(__name__)

# model_type -> the config field holding the FFN inner width (one value for every layer).
FFN_WIDTH_FIELDS = {
    "bert": "intermediate_size",
    "roberta": "intermediate_size",
    "vit": "intermediate_size",
    "llama": "intermediate_size",
    "distilbert": "hidden_dim",
}


def _stock_skeleton(model: RMTKDPreTrainedModel):
    """``(meta-device stock skeleton, None)`` if ``model`` exports as its base architecture, else ``(None, why)``."""
    if not isinstance(model, RMTKDPreTrainedModel):
        return None, f"expected an RMT-KD model (RMTKD*), got {type(model).__name__}"
    reductions = model.config.reductions
    model_type = model.config.base_config["model_type"]
    kinds = sorted({entry["kind"] for entry in reductions.values()} - {"ffn_width"})
    if kinds:
        return None, f"the model has {', '.join(kinds)} reductions, which no stock architecture can express"
    widths = sorted({entry["width"] for entry in reductions.values()})
    if len(widths) > 1:
        return None, f"FFN widths differ between layers ({widths}); stock configs hold one width"
    config = model.config.base_model_config()
    if widths:
        if model_type not in FFN_WIDTH_FIELDS:
            return None, f"no known single FFN-width config field for model_type '{model_type}'"
        setattr(config, FFN_WIDTH_FIELDS[model_type], widths[0])
    # Every FFN must have been cut: compare the stock skeleton's shapes with the reduced model's, tensor by tensor.
    with torch.device("meta"):
        stock = type(model.model)(config)
    expected = {name: tuple(t.shape) for name, t in stock.state_dict().items()}
    actual = {name: tuple(t.shape) for name, t in model.model.state_dict().items()}
    for name in sorted(expected.keys() | actual.keys()):
        if expected.get(name) != actual.get(name):
            return None, (
                f"tensor '{name}' is {actual.get(name)} but the stock config gives {expected.get(name)} "
                "(not every FFN was cut to the same width)"
            )
    return stock, None


def can_export_stock(model: RMTKDPreTrainedModel) -> bool:
    """Whether :func:`export_stock` can write ``model`` as its plain base architecture."""
    return _stock_skeleton(model)[0] is not None


def export_stock(model: RMTKDPreTrainedModel, save_directory, **save_kwargs) -> None:
    """Save a uniformly FFN-width-reduced model as the stock base architecture.

    Writes the base config with the new width, the base class's weights (keys without the ``model.`` prefix) and the
    generation config; no RMT-KD code, so plain ``transformers`` loads it.

    Args:
        model: an RMT-KD model whose reductions are all ``ffn_width`` with one width, on an architecture that keeps
            its FFN width in one config field (BERT, RoBERTa, ViT, LLaMA ``intermediate_size``; DistilBERT
            ``hidden_dim``).
        save_directory: output folder.
        save_kwargs: passed to ``save_pretrained``.

    Raises:
        ValueError: saying why the model cannot be expressed as its stock architecture.
    """
    stock, reason = _stock_skeleton(model)
    if stock is None:
        raise ValueError(f"Cannot export as a stock checkpoint: {reason}. Save it with save_pretrained() instead.")
    # Share the reduced model's tensors (no copy); `assign` keeps tied parameters tied. Non-persistent buffers
    # (position ids, rotary frequencies) are not in the state dict, so share those by hand.
    stock.load_state_dict(model.model.state_dict(), assign=True)
    for name, buffer in model.model.named_buffers():
        owner, _, buffer_name = name.rpartition(".")
        stock.get_submodule(owner)._buffers[buffer_name] = buffer
    stock.tie_weights()
    if stock.can_generate() and getattr(model, "generation_config", None) is not None:
        stock.generation_config = copy.deepcopy(model.generation_config)
    stock.save_pretrained(save_directory, **save_kwargs)
    logger.info(f"Exported a stock {type(stock).__name__} to {save_directory}")
