"""``attention_heads``: keep the attention heads that carry the attention output's signal; drop the others whole.

Let a (d = H·h) be the input of the attention output projection, the H heads' outputs side by side (h features each),
with mean μ and covariance Σ = U Λ Uᵀ on calibration data. Its k outlier directions (above the MP edge) carry the
signal variances s₁ … s_k (`hf_rmtkd.spectrum.signal_variances`). Head j holds the part of that signal lying in its own
h coordinates:

    m_j = Σ_{i≤k} s_i ‖U[j·h:(j+1)·h, i]‖²

The heads are ranked by m_j. Keeping heads J (every feature of each) slices q, k and v to J's rows and refits the
output projection on the kept features by least squares, as ``ffn_width``'s ``select`` does: W_o' = W_o A with
A = Σ[:, J] Σ[J, J]⁻¹ and the mean of what is dropped moved into the bias. Heads are independent until the output
projection, so a kept head computes exactly what it did before.

This is the kind that makes attention itself cheaper: softmax(QKᵀ)V costs the same per head whatever rank ``low_rank``
gives q/k/v, and on a small BERT it is about a third of the forward time once the linear layers are cut.

Example:
    >>> mass = head_signal(eigenvectors[:, :k], signal, head_dim=32)  # doctest: +SKIP
    >>> heads_holding(mass, 0.9)  # the fewest heads holding 90% of the signal, ascending  # doctest: +SKIP
    [0, 2, 5, 7, 8, 11]
"""

import torch
from torch import nn

from ..modeling.layers_rmtkd import consumer_width, get_submodule, plan_attention_heads, set_submodule
from .ffn_width import keep_features


def head_signal(directions: torch.Tensor, weights: torch.Tensor, head_dim: int) -> torch.Tensor:
    """How much of the weighted directions each head's features hold: m_j = Σ_i w_i ‖U[head j, i]‖².

    Args:
        directions: U, shape (d, k), orthonormal columns (e.g. the site's outlier eigenvectors).
        weights: w, shape (k,), non-negative (e.g. their signal variances).
        head_dim: h, the features of one head; d must be a multiple of it.

    Returns:
        Shape (d / h,) float64, summing to Σ w_i when U's columns lie in the heads' span (they always do here).
    """
    d, k = directions.shape
    if d % head_dim:
        raise ValueError(f"attention_heads: a width of {d} features is not a whole number of heads of {head_dim}.")
    U = directions.to(torch.float64)
    loading = U.pow(2).reshape(d // head_dim, head_dim, k).sum(1)  # (H, k): ‖U[head j, i]‖²
    return loading @ weights.to(U)


def heads_holding(mass: torch.Tensor, fraction: float) -> list[int]:
    """The fewest heads whose masses add up to ``fraction`` of the total, largest first; returned in ascending order.

    A fraction of 1 keeps every head with any mass, a fraction of 0 the largest head alone. When no head has any mass,
    every head is kept (nothing to rank by).
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    total = float(mass.sum())
    if total <= 0:
        return list(range(mass.numel()))
    order = torch.argsort(mass, descending=True)
    held = torch.cumsum(mass[order], 0) / total
    count = min(mass.numel(), int((held < fraction - 1e-12).sum()) + 1)
    return sorted(order[:count].tolist())


@torch.no_grad()
def apply_attention_heads(
    model: nn.Module,
    consumer: str,
    producers: list[str],
    *,
    covariance: torch.Tensor,
    mean: torch.Tensor | None,
    heads: list[int],
    head_dim: int,
    ridge: float = 1e-6,
) -> nn.Module:
    """Keep only ``heads`` of the attention whose output projection is ``consumer`` (q/k/v are ``producers``).

    Args:
        model: the base model, modified in place.
        consumer: module path of the attention output projection (``nn.Linear``), e.g. ``attention.output.dense``.
        producers: the q, k and v projections (``nn.Linear``), whose output rows are sliced to the kept heads.
        covariance: Σ, shape (d, d), float64, the centred covariance of the consumer's input.
        mean: μ, shape (d,), its mean; ``None`` if ``covariance`` is an uncentred second moment.
        heads: indices of the heads to keep (each in [0, d / head_dim)).
        head_dim: the features of one head.
        ridge: relative ridge of the least-squares refit.

    Returns:
        The installed output projection (a plain ``nn.Linear`` reading ``len(heads) · head_dim`` features).
    """
    d = consumer_width(consumer, get_submodule(model, consumer))
    n_heads = d // head_dim if head_dim > 0 else 0
    kept = sorted(set(int(h) for h in heads))
    if not kept or kept[0] < 0 or kept[-1] >= n_heads or len(kept) != len(heads):
        raise ValueError(
            f"attention_heads '{consumer}': heads must be distinct indices in [0, {n_heads}) (the projection reads "
            f"{d} features in heads of {head_dim}), got {list(heads)}."
        )
    entry = {"kind": "attention_heads", "width": len(kept) * head_dim, "head_dim": head_dim,
             "producers": list(producers)}
    new = plan_attention_heads(model, consumer, entry)
    old = {path: get_submodule(model, path) for path in new}
    if tuple(covariance.shape) != (d, d):
        raise ValueError(f"attention_heads '{consumer}': covariance must have shape {(d, d)}, got "
                         f"{tuple(covariance.shape)}.")
    sigma = covariance.to(torch.float64)
    mu = torch.zeros(d, dtype=torch.float64, device=sigma.device) if mean is None else mean.to(sigma)
    keep = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept]).to(sigma.device)
    keep_features(old, new, consumer, producers, keep, sigma, mu, ridge)
    for path, module in new.items():
        set_submodule(model, path, module)
    return new[consumer]
