"""``low_rank``: factor a Linear / GPT-2 Conv1D / Conv2d through the top-k directions of its input.

With P (k × d_in, orthonormal rows: the top-k eigenvectors of the input covariance) and μ the input mean,

    W x + b  =  W (PᵀP x + (I − PᵀP) x) + b  ≈  (W Pᵀ)(P x) + [b + W (I − PᵀP) μ],

i.e. the part of x outside the kept subspace is replaced by its mean. The result is exact on the kept subspace and
exact everywhere at k = d_in. Layers reading the same input (q/k/v) are cut with the same P, so they share it: one
copy of P and one product P x per forward pass instead of three.
"""

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..modeling.layers_rmtkd import get_submodule, link_shared_projection, plan_low_rank, set_submodule


def low_rank_parameters(d_in: int, d_out: int, rank: int) -> int:
    """Parameters of a rank-``rank`` factorisation of a d_out × d_in layer: rank·(d_in + d_out) + d_out (bias)."""
    return rank * (d_in + d_out) + d_out


def low_rank_pays(d_in: int, d_out: int, rank: int) -> bool:
    """Whether factoring saves parameters at all: rank·(d_in + d_out) < d_in·d_out."""
    return rank * (d_in + d_out) < d_in * d_out


def _check_projection(path: str, projection: torch.Tensor, mean, d_in: int) -> None:
    if projection.ndim != 2 or projection.shape[1] != d_in or not 1 <= projection.shape[0] <= d_in:
        raise ValueError(
            f"low_rank '{path}': projection must be (k, {d_in}) with 1 <= k <= {d_in}, got {tuple(projection.shape)}."
        )
    if mean is not None and tuple(mean.shape) != (d_in,):
        raise ValueError(f"low_rank '{path}': mean must have shape ({d_in},), got {tuple(mean.shape)}.")


def _check_shared_projection(model: nn.Module, path: str, holder_path: str, projection: torch.Tensor) -> None:
    """The layer at ``holder_path`` must already hold ``projection``: W Pᵀ is only right for the P it will read."""
    holder = get_submodule(model, holder_path)
    held = getattr(holder, "down", None)
    if held is None or held.weight.shape != projection.shape or not torch.allclose(
        held.weight.to(projection), projection, atol=1e-4
    ):
        raise ValueError(
            f"low_rank '{path}': shares_projection_with='{holder_path}', but that layer does not hold this "
            "projection; cut the holder first with the same P (the top eigenvectors of the input both layers read)."
        )


@torch.no_grad()
def apply_low_rank(
    model: nn.Module,
    path: str,
    projection: torch.Tensor,
    mean: torch.Tensor | None = None,
    shares_projection_with: str | None = None,
) -> nn.Module:
    """Replace the layer at ``path`` by its low-rank factorisation through ``projection``.

    Args:
        model: the base model, modified in place.
        path: module path of an ``nn.Linear``, GPT-2 ``Conv1D`` or ``nn.Conv2d`` (groups=1; reduced by input channels).
        projection: P, shape (k, d_in), orthonormal rows (the top-k eigenvectors of the input covariance, as rows).
        mean: μ, shape (d_in,), the input mean when the statistics were centred; ``None`` for uncentred statistics.
        shares_projection_with: path of a layer reading the same input, already cut with this ``projection``; the
            new layer then holds only W Pᵀ and reads P x from it.

    Returns:
        The installed :class:`LowRankLinear` or :class:`LowRankConv2d`. For a convolution the centring term becomes a
        per-channel bias, which is exact away from the zero-padded border.
    """
    old = get_submodule(model, path)
    entry = {"kind": "low_rank", "rank": int(projection.shape[0])}
    if shares_projection_with is not None:
        entry["shares_projection_with"] = shares_projection_with
    new = plan_low_rank(model, path, entry)[path]
    weight = old.weight.detach().to(torch.float64)
    if isinstance(old, Conv1D):
        weight = weight.T  # Conv1D stores (d_in, d_out)
    d_in = weight.shape[1]
    _check_projection(path, projection, mean, d_in)
    P = projection.to(weight.device, torch.float64)  # (k, d_in)
    mu = torch.zeros(d_in, dtype=torch.float64, device=weight.device) if mean is None else mean.to(weight)
    rest = mu - P.T @ (P @ mu)  # (I - PᵀP) μ: the mean of the dropped directions
    bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    if old.bias is not None:
        bias = old.bias.detach().to(torch.float64)

    if isinstance(old, nn.Conv2d):  # weight (c_out, c_in, kh, kw)
        new.down.weight.copy_(P[:, :, None, None])
        new.conv.weight.copy_(torch.einsum("oihw,ki->okhw", weight, P))
        new.conv.bias.copy_(bias + torch.einsum("oihw,i->o", weight, rest))
    else:  # weight (d_out, d_in)
        if new.shares_projection:
            _check_shared_projection(model, path, shares_projection_with, P)
        else:
            new.down.weight.copy_(P)
        new.up.weight.copy_(weight @ P.T)
        new.up.bias.copy_(bias + weight @ rest)
    set_submodule(model, path, new)
    link_shared_projection(model, path, entry)
    return new
