"""Reduction kinds, registered by name so the trainer never special-cases one.

``REDUCTIONS[kind]`` is a :class:`Reduction` with

- ``build(model, path, entry)``: install modules of the reduced shapes from the map entry alone (what the checkpoint
  classes do at load time, on the meta device);
- ``surgery``: the kind's named function computing the reduced weights from tensors (``apply_low_rank``,
  ``apply_ffn_width``, ``apply_attention_heads``, ``apply_embedding``);
- ``apply(model, path, entry, *, covariance, mean, eigenvalues, eigenvectors, **options)``: the surgery driven by a
  map entry and the site's spectral statistics, with one signature for every kind;
- ``parameter_savings(model, path, entry)``: exact parameters removed by the entry (negative: the cut costs
  parameters, so the planner should skip it).

``residual`` is the one kind that is not cut site by site: it narrows the whole residual stream of a post-LayerNorm
encoder, so `cut_residual_stream` runs before the per-site plan (in `RMTKDTrainer`'s first round and in `compress`)
and the kind has no ``REDUCTIONS`` entry.

The module classes and shape-only builders live in ``hf_rmtkd.modeling.layers_rmtkd`` because checkpoints carry
only the ``modeling`` files.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..modeling.layers_rmtkd import build_reduction, get_submodule, plan_reduction
from ..utils import count_parameters
from .attention_heads import apply_attention_heads, head_signal, heads_holding
from .embedding import apply_embedding, embedding_parameters, token_ids_used
from .ffn_width import apply_ffn_width, reconstruction_map, select_neurons
from .low_rank import apply_low_rank, low_rank_parameters, low_rank_pays
from .residual import cut_residual_stream, narrow_residual_stream


def parameter_savings(model: nn.Module, path: str, entry: dict) -> int:
    """Parameters a map entry would remove from ``model``: the replaced modules' count minus the new modules'.

    Sizes the new modules on the meta device, so nothing is allocated.

    Args:
        model: the model before the cut.
        path: the entry's module path.
        entry: the map entry, e.g. ``{"kind": "low_rank", "rank": 8}``.

    Returns:
        Saved parameters (negative when the reduction would add parameters).
    """
    new = plan_reduction(model, path, entry, device="meta")
    before = count_parameters(*(get_submodule(model, target) for target in new))
    return before - count_parameters(*new.values())


def _top_rows(eigenvectors: torch.Tensor, rank: int) -> torch.Tensor:
    return eigenvectors[:, :rank].T  # (k, d): the top-k eigenvectors as rows


def _apply_low_rank(model, path, entry, *, covariance=None, mean=None, eigenvalues=None, eigenvectors, **options):
    projection = _top_rows(eigenvectors, entry["rank"])
    return apply_low_rank(model, path, projection, mean, entry.get("shares_projection_with"), **options)


def _apply_embedding(model, path, entry, *, covariance=None, mean=None, eigenvalues=None, eigenvectors, **options):
    return apply_embedding(model, path, _top_rows(eigenvectors, entry["rank"]), mean, **options)


def _apply_ffn_width(model, path, entry, *, covariance, mean, eigenvalues, eigenvectors, **options):
    return apply_ffn_width(
        model,
        path,
        entry["producers"],
        covariance=covariance,
        mean=mean,
        eigenvectors=eigenvectors,
        eigenvalues=eigenvalues,
        width=entry["width"],
        **options,
    )


def _apply_attention_heads(model, path, entry, *, covariance, mean, eigenvalues, eigenvectors, **options):
    if "heads" not in entry:  # which heads to keep is the planner's decision; the surgery does not guess it
        raise ValueError(f"attention_heads entry for '{path}' needs 'heads', the indices of the heads to keep.")
    return apply_attention_heads(model, path, entry["producers"], covariance=covariance, mean=mean,
                                 heads=entry["heads"], head_dim=entry["head_dim"], **options)


@dataclass(frozen=True)
class Reduction:
    """One reduction kind: its shape-only builder, its surgery and a uniform entry point (see module docstring)."""

    name: str
    build: Callable[..., nn.Module]
    surgery: Callable[..., nn.Module]
    apply: Callable[..., nn.Module]
    parameter_savings: Callable[[nn.Module, str, dict], int] = parameter_savings


REDUCTIONS: dict[str, Reduction] = {
    "low_rank": Reduction("low_rank", build_reduction, apply_low_rank, _apply_low_rank),
    "ffn_width": Reduction("ffn_width", build_reduction, apply_ffn_width, _apply_ffn_width),
    "attention_heads": Reduction("attention_heads", build_reduction, apply_attention_heads, _apply_attention_heads),
    "embedding": Reduction("embedding", build_reduction, apply_embedding, _apply_embedding),
}

__all__ = [
    "REDUCTIONS",
    "Reduction",
    "apply_attention_heads",
    "apply_embedding",
    "apply_ffn_width",
    "apply_low_rank",
    "cut_residual_stream",
    "embedding_parameters",
    "head_signal",
    "heads_holding",
    "low_rank_parameters",
    "low_rank_pays",
    "narrow_residual_stream",
    "parameter_savings",
    "reconstruction_map",
    "select_neurons",
    "token_ids_used",
]
