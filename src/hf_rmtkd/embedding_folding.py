"""Fold a narrowed encoder's embeddings into its first stream segment: the inference form of the ``residual`` kind.

With the ``residual`` kind the stream between LayerNorms is held in k + 1 coordinates, but the embeddings are still
summed at the full width d (the token's up-projected code, its position, its token type) before the first
LayerNorm moves them into those coordinates. That sum and the norm's statistics are linear or quadratic in the code,
so they fold into a few small matrices and per-(token type, position) tables (`FoldedEmbeddings` has the algebra):
the same outputs, no d-wide activation left before the last layer, and on MiniLM-L6 with the ``residual`` kind
x1.06 faster at batch 32 and x1.03 at batch 1, timed head to head (``benchmarks/attention_shapes.py``). Each fold is
recorded in the reduction map as a ``folded_embeddings`` entry, so ``from_pretrained`` rebuilds the same module.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from .architectures import unique_module_path
from .modeling.layers_rmtkd import (
    LowRankEmbedding,
    ReducedLayerNorm,
    get_submodule,
    plan_reduction,
    set_submodule,
)
from .modeling.modeling_rmtkd import RMTKDPreTrainedModel
from .reductions.residual import POST_NORM_MODEL_TYPES

logger = logging.get_logger(__name__)

__all__ = ["can_fold_embeddings", "fold_embeddings"]


@torch.no_grad()
def _fold_tables(embeddings: nn.Module) -> dict[str, torch.Tensor]:
    """`FoldedEmbeddings`' tensors from the modules it replaces (float64)."""
    words, norm = embeddings.word_embeddings, embeddings.LayerNorm
    up = words.up.weight.double()
    centred_up = up - up.mean(0)  # C U
    positions = embeddings.position_embeddings.weight.double()
    types = getattr(embeddings, "token_type_embeddings", None)  # DistilBERT has none: one type, adding nothing
    types = torch.zeros_like(positions[:1]) if types is None else types.weight.double()
    constant = (words.up.bias.double() + types[:, None, :] + positions[None, :, :]).flatten(0, 1)  # c per pair
    constant = constant - constant.mean(-1, keepdim=True)  # C c
    reader = norm.weight.double()
    return {"gram": centred_up.T @ centred_up, "cross": constant @ centred_up, "constant": constant.square().sum(-1),
            "reader": reader @ centred_up, "offsets": constant @ reader.T + norm.offset.double(),
            "bias": norm.bias.double()}


def _embeddings_to_fold(model) -> tuple[str | None, str | None]:
    """``(path of the embeddings module, None)`` if `fold_embeddings` can fold ``model``, else ``(None, why not)``."""
    if not isinstance(model, RMTKDPreTrainedModel):
        return None, (f"expected an RMT-KD model (RMTKD*), got {type(model).__name__}; compress it with the residual "
                      "and embedding kinds first")
    model_type = model.config.base_config.get("model_type")
    if model_type not in POST_NORM_MODEL_TYPES:
        return None, (f"it folds the embeddings of post-LayerNorm encoders (model types "
                      f"{list(POST_NORM_MODEL_TYPES)}); this model's base is {model_type!r}")
    folded = [path for path, entry in model.config.reductions.items() if entry.get("kind") == "folded_embeddings"]
    if folded:
        return None, f"'{folded[0]}' is folded already"
    norm_path = unique_module_path(model.model, "embeddings.LayerNorm")
    if norm_path is None:
        return None, f"{type(model.model).__name__} has no single 'embeddings.LayerNorm' module"
    path = norm_path.removesuffix(".LayerNorm")
    embeddings = get_submodule(model.model, path)
    words, norm = embeddings.word_embeddings, embeddings.LayerNorm
    if not isinstance(words, LowRankEmbedding):
        return None, (f"'{path}.word_embeddings' is a {type(words).__name__}; the fold needs the token embedding "
                      "factored (the embedding kind among the reduction kinds)")
    if not (isinstance(norm, ReducedLayerNorm) and norm.full_input):
        return None, (f"'{norm_path}' is a {type(norm).__name__} that does not start a narrowed stream; the fold "
                      "needs the residual kind among the reduction kinds")
    return path, None


def can_fold_embeddings(model) -> bool:
    """Whether :func:`fold_embeddings` can fold ``model``'s embeddings."""
    return _embeddings_to_fold(model)[0] is not None


def fold_embeddings(model: RMTKDPreTrainedModel) -> RMTKDPreTrainedModel:
    """Fold the embeddings of an encoder compressed with the ``residual`` and ``embedding`` kinds into its narrow
    stream (BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT).

    The model's eval-mode outputs are unchanged (up to float rounding); the folded tables are derived from the
    embeddings and do not train (the token codes still may), so fold last, after compression and distillation. The
    model is modified in place.

    Args:
        model: an RMT-KD model of a post-LayerNorm encoder whose token embedding was factored (the ``embedding``
            kind) and whose residual stream was narrowed (the ``residual`` kind), e.g. what `RMTKDTrainer` returns with
            ``reduction_kinds=["residual", ...]``.

    Returns:
        The same model, with a ``folded_embeddings`` entry in ``config.reductions``.

    Raises:
        ValueError: the model is not such an encoder.

    Example:
        ```python
        >>> import hf_rmtkd
        >>> small = hf_rmtkd.compress(bert, calibration, kinds=("residual", "embedding"))  # doctest: +SKIP
        >>> small = hf_rmtkd.fold_embeddings(small)  # doctest: +SKIP
        >>> small.save_pretrained("bert-folded")  # from_pretrained rebuilds FoldedEmbeddings  # doctest: +SKIP
        ```
    """
    path, why_not = _embeddings_to_fold(model)
    if path is None:
        raise ValueError(f"fold_embeddings: {why_not}.")
    embeddings = get_submodule(model.model, path)
    words, norm = embeddings.word_embeddings, embeddings.LayerNorm
    entry = {"kind": "folded_embeddings", "rank": words.rank, "width": norm.output_width, "rows": words.rows}
    tables = _fold_tables(embeddings)
    new = plan_reduction(model.model, path, entry)[path]
    with torch.no_grad():
        new.word_embeddings.weight.copy_(words.embed.weight)
        if words.rows is not None:
            new.token_rows.copy_(words.token_rows)
        for name, table in tables.items():
            getattr(new, name).copy_(table)
    set_submodule(model.model, path, new)
    model.config.reductions = {**model.config.reductions, path: entry}
    logger.info(f"Folded '{path}' into the first stream segment ({norm.output_width} coordinates).")
    return model
