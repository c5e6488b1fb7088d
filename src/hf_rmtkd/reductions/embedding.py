"""``embedding``: store token embeddings as k-dimensional codes plus a shared up-projection.

With P (k × d, orthonormal rows: the top-k eigenvectors of the embedding-output covariance) and μ its mean,

    E[v]  =  PᵀP E[v] + (I − PᵀP) E[v]  ≈  Pᵀ (P E[v]) + (I − PᵀP) μ,

so the codes are E Pᵀ (V × k) and the up-projection is Pᵀ with bias (I − PᵀP) μ. Exact at k = d.
"""

import torch
from torch import nn

from ..modeling.layers_rmtkd import get_submodule, plan_embedding, set_submodule


def embedding_parameters(vocab_size: int, dim: int, rank: int) -> int:
    """Parameters of a rank-``rank`` embedding: V·k codes + d·k up-projection + d bias."""
    return rank * (vocab_size + dim) + dim


@torch.no_grad()
def apply_embedding(
    model: nn.Module, path: str, projection: torch.Tensor, mean: torch.Tensor | None = None
) -> nn.Module:
    """Replace the ``nn.Embedding`` at ``path`` by a :class:`LowRankEmbedding` through ``projection``.

    Args:
        model: the base model, modified in place. Embeddings tied to an output head are refused (factoring one would
            silently untie the LM head).
        path: module path of an ``nn.Embedding(V, d)``; ``padding_idx`` is kept.
        projection: P, shape (k, d), orthonormal rows.
        mean: μ, shape (d,), the embedding-output mean when the statistics were centred; else ``None``.

    Returns:
        The installed :class:`LowRankEmbedding`.
    """
    old = get_submodule(model, path)
    new = plan_embedding(model, path, {"kind": "embedding", "rank": int(projection.shape[0])})[path]
    table = old.weight.detach().to(torch.float64)  # (V, d)
    d = table.shape[1]
    if projection.ndim != 2 or projection.shape[1] != d:
        raise ValueError(f"embedding '{path}': projection must be (k, {d}), got {tuple(projection.shape)}.")
    if mean is not None and tuple(mean.shape) != (d,):
        raise ValueError(f"embedding '{path}': mean must have shape ({d},), got {tuple(mean.shape)}.")
    P = projection.to(table.device, torch.float64)  # (k, d)
    mu = torch.zeros(d, dtype=torch.float64, device=table.device) if mean is None else mean.to(table)
    new.embed.weight.copy_(table @ P.T)
    new.up.weight.copy_(P.T)
    new.up.bias.copy_(mu - P.T @ (P @ mu))
    set_submodule(model, path, new)
    return new
