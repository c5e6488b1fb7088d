"""``ffn_width``: shrink an FFN's inner width (producers' outputs, consumer's input) from d to k.

Let h (d) be the consumer's input, the FFN's inner activation, with mean μ and covariance Σ on calibration data, and
Σ = U Λ Uᵀ (eigenvalues descending). Two ways to keep k dimensions:

- ``"select"`` (default): keep k whole neurons J, chosen greedily so that they span the top-k eigen-directions
  (pivoted Gram–Schmidt on the rows of U_k Λ_k^½), slice the producers to J and refit the consumer by least squares.
  The best linear reconstruction of h from h_J is ĥ = A h_J + (μ − A μ_J) with A = Σ[:, J] Σ[J, J]⁻¹, so the
  consumer becomes W2' = W2 A with bias b2 + W2 (μ − A μ_J). A consumer without bias cannot absorb a constant, so it
  is refit on the uncentred second moment Σ + μμᵀ instead (the least-squares fit with no intercept).
- ``"fold"`` (the paper's literal rotation): P = U_kᵀ, producer P W1, P b1; consumer W2 Pᵀ with bias
  b2 + W2 (I − PᵀP) μ. The rotation does not commute with the activation, so this is only approximate; it needs one
  Linear producer and no norm.

For a convolutional consumer the channel covariance gives A, applied to every kernel tap: for a 1×1 convolution this
is the least-squares refit; for a k×k one it reconstructs each input pixel from the kept channels (the exact output
refit would need the covariance of whole patches, which calibration does not collect). Because that reconstruction is
linear with no constant term when the consumer has no bias, zero padding stays consistent.
"""

import torch
from torch import nn
from transformers.utils import logging

from ..modeling.layers_rmtkd import consumer_width, get_submodule, plan_ffn_width, set_submodule

logger = logging.get_logger(__name__)

METHODS = ("select", "fold")


def select_neurons(eigenvectors: torch.Tensor, eigenvalues: torch.Tensor, width: int) -> torch.Tensor:
    """Pick ``width`` neurons whose activations best span the top-``width`` eigen-directions.

    Greedy column-pivoted QR on Bᵀ with B = U_k Λ_k^½ (row i: how neuron i loads on the kept directions): take the
    neuron with the largest residual loading, project its direction out of every row, repeat.

    Args:
        eigenvectors: U, shape (d, d), columns sorted by descending eigenvalue.
        eigenvalues: λ, shape (d,), descending.
        width: k, the number of neurons to keep.

    Returns:
        The kept neuron indices, shape (k,), sorted ascending (the neurons keep their order).
    """
    d = eigenvectors.shape[0]
    U = eigenvectors.to(torch.float64)
    lam = eigenvalues.to(torch.float64).clamp_min(0)
    residual = U[:, :width] * lam[:width].sqrt()  # B: (d, k)
    variance = (U.pow(2) * lam).sum(1)  # diag Σ: tie-break once the kept directions are spanned
    chosen = torch.zeros(d, dtype=torch.bool, device=U.device)
    scale = residual.pow(2).sum(1).max().clamp_min(torch.finfo(torch.float64).tiny)
    for _ in range(width):
        score = residual.pow(2).sum(1)
        if score.masked_fill(chosen, 0).max() <= 1e-12 * scale:
            score = variance  # B has rank < k (zero eigenvalues): fall back on plain variance
        j = int(score.masked_fill(chosen, -1).argmax())
        chosen[j] = True
        q = residual[j] / residual[j].norm().clamp_min(torch.finfo(torch.float64).tiny)
        residual = residual - torch.outer(residual @ q, q)
    return chosen.nonzero().squeeze(1)


def reconstruction_map(second_moment: torch.Tensor, keep: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """A = C[:, J] (C[J, J] + r I)⁻¹: the least-squares reconstruction of all d features from the kept ones.

    Args:
        second_moment: C, shape (d, d), float64 (centred covariance, or uncentred second moment).
        keep: J, shape (k,), kept feature indices.
        ridge: r relative to the mean diagonal of C[J, J]; keeps the solve stable when features are collinear.

    Returns:
        A, shape (d, k). Identity rows on J when J is all of 0..d-1 (nothing to reconstruct).
    """
    d = second_moment.shape[0]
    if keep.numel() == d:
        return torch.eye(d, dtype=second_moment.dtype, device=second_moment.device)[:, keep]
    C_JJ = second_moment[keep][:, keep]
    r = ridge * C_JJ.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(keep.numel(), dtype=C_JJ.dtype, device=C_JJ.device)
    return torch.linalg.solve(C_JJ + r * eye, second_moment[keep, :]).T


def _slice_producer(old: nn.Module, new: nn.Module, keep: torch.Tensor) -> None:
    """Copy the kept output neurons of a producer (Linear / Conv2d rows, norm features and running stats)."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(old, name, None)
        if tensor is not None:
            getattr(new, name).copy_(tensor[keep.to(tensor.device)])
    if getattr(old, "num_batches_tracked", None) is not None:
        new.num_batches_tracked.copy_(old.num_batches_tracked)
    if isinstance(old, nn.LayerNorm):
        logger.warning_once(
            "ffn_width: slicing a LayerNorm over the FFN inner width changes the statistics it normalises with; "
            "the cut is approximate there."
        )


def _set_consumer(old: nn.Module, new: nn.Module, mix: torch.Tensor, shift: torch.Tensor) -> None:
    """Write the consumer acting on kept features: weight W·mix (per kernel tap), bias b + W·shift.

    Args:
        old: the original consumer (Linear or Conv2d).
        new: the narrowed consumer.
        mix: (d, k) map from the k kept features to the d original ones.
        shift: (d,) constant added to the reconstructed features (ignored when the consumer has no bias).
    """
    weight = old.weight.detach().to(torch.float64)
    mix, shift = mix.to(weight.device), shift.to(weight.device)
    if weight.ndim == 4:  # Conv2d (c_out, d, kh, kw)
        new.weight.copy_(torch.einsum("oihw,ik->okhw", weight, mix))
        offset = torch.einsum("oihw,i->o", weight, shift)
    else:  # Linear (d_out, d)
        new.weight.copy_(weight @ mix)
        offset = weight @ shift
    if old.bias is not None:
        new.bias.copy_(old.bias.detach().to(torch.float64) + offset)


def _fold(old: dict, new: dict, consumer: str, producer: str, U_k: torch.Tensor, mu: torch.Tensor) -> None:
    P = U_k.T  # (k, d)
    prod_old, prod_new = old[producer], new[producer]
    prod_new.weight.copy_(P @ prod_old.weight.detach().to(P))
    if prod_old.bias is not None:
        prod_new.bias.copy_(P @ prod_old.bias.detach().to(P))
    # The consumer sees Pᵀ(P h) in place of h; the dropped directions are replaced by their mean (I − PᵀP) μ.
    _set_consumer(old[consumer], new[consumer], P.T, mu - P.T @ (P @ mu))


def keep_features(old: dict, new: dict, consumer: str, producers: list[str], keep: torch.Tensor, sigma: torch.Tensor,
                  mu: torch.Tensor, ridge: float = 1e-6) -> None:
    """Fill narrowed modules that keep features J: producers sliced to J, the consumer refit by least squares.

    Args:
        old, new: ``{path: module}`` before and after (same keys: the consumer and every producer).
        consumer, producers: the paths.
        keep: J, the kept feature indices, sorted ascending.
        sigma: Σ, the centred covariance of the consumer's input, (d, d) float64.
        mu: μ, its mean, (d,) (zeros when the statistics are uncentred).
        ridge: relative ridge of the refit.
    """
    for producer in producers:
        _slice_producer(old[producer], new[producer], keep)
    # A consumer with a bias absorbs the mean term, so fit on Σ; without one, fit on Σ + μμᵀ (no intercept).
    has_bias = old[consumer].bias is not None
    second_moment = sigma if has_bias else sigma + torch.outer(mu, mu)
    mix = reconstruction_map(second_moment, keep, ridge)  # (d, k)
    _set_consumer(old[consumer], new[consumer], mix, mu - mix @ mu[keep])


@torch.no_grad()
def apply_ffn_width(
    model: nn.Module,
    consumer: str,
    producers: list[str],
    *,
    covariance: torch.Tensor,
    mean: torch.Tensor | None,
    eigenvectors: torch.Tensor,
    eigenvalues: torch.Tensor,
    width: int,
    method: str = "select",
    ridge: float = 1e-6,
) -> nn.Module:
    """Shrink the FFN inner width read by ``consumer`` (and written by ``producers``) to ``width``.

    Args:
        model: the base model, modified in place.
        consumer: module path of the layer reading the inner activation (``nn.Linear`` or ``nn.Conv2d``).
        producers: module paths whose output is the inner width (Linear / Conv2d out, BatchNorm2d / LayerNorm), e.g.
            LLaMA ``[gate_proj, up_proj]``, ResNet ``[conv, bn]``.
        covariance: Σ, shape (d, d), float64, the centred covariance of the consumer's input (for a conv: over
            channels, every pixel a sample).
        mean: μ, shape (d,), its mean; ``None`` if ``covariance`` is an uncentred second moment.
        eigenvectors: U, shape (d, d), from ``torch.linalg.eigh(Σ)``, columns sorted by descending eigenvalue.
        eigenvalues: λ, shape (d,), descending.
        width: k, the new inner width, 1 <= k <= d.
        method: ``"select"`` (keep k neurons, refit the consumer) or ``"fold"`` (rotate onto the top-k eigenvectors).
        ridge: relative ridge of the ``select`` refit.

    Returns:
        The installed consumer (a plain ``nn.Linear`` / ``nn.Conv2d`` with ``width`` inputs).
    """
    if method not in METHODS:
        raise ValueError(f"ffn_width '{consumer}': method must be one of {METHODS}, got {method!r}.")
    new = plan_ffn_width(model, consumer, {"kind": "ffn_width", "width": width, "producers": list(producers)})
    old = {path: get_submodule(model, path) for path in new}
    d = consumer_width(consumer, old[consumer])
    shapes = {"covariance": (d, d), "mean": (d,), "eigenvectors": (d, d), "eigenvalues": (d,)}
    given = {"covariance": covariance, "mean": mean, "eigenvectors": eigenvectors, "eigenvalues": eigenvalues}
    for name, tensor in given.items():
        if tensor is not None and tuple(tensor.shape) != shapes[name]:
            raise ValueError(
                f"ffn_width '{consumer}': {name} must have shape {shapes[name]}, got {tuple(tensor.shape)}."
            )
    sigma = covariance.to(torch.float64)
    mu = torch.zeros(d, dtype=torch.float64, device=sigma.device) if mean is None else mean.to(sigma)

    if method == "fold":
        if (
            len(producers) != 1
            or not isinstance(old[producers[0]], nn.Linear)
            or not isinstance(old[consumer], nn.Linear)
        ):
            raise ValueError(
                f"ffn_width '{consumer}': method='fold' needs a single nn.Linear producer and an nn.Linear consumer "
                f"(got producers {list(producers)}); gated or normalised FFNs (LLaMA gate/up, ResNet conv+BN) cannot "
                "be rotated through their nonlinearity. Use method='select'."
            )
        _fold(old, new, consumer, producers[0], eigenvectors[:, :width].to(sigma), mu)
    else:
        keep = select_neurons(eigenvectors, eigenvalues, width).to(sigma.device)
        keep_features(old, new, consumer, producers, keep, sigma, mu, ridge)

    for path, module in new.items():
        set_submodule(model, path, module)
    return new[consumer]
