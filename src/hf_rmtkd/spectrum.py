"""The random-matrix core of RMT-KD: covariance statistics, the Marchenko–Pastur law and the outlier count.

Read top to bottom, this is the whole spectral method (DESIGN §2, steps 1–4):

1. `CovarianceAccumulator` streams ``S = Σ xᵢxᵢᵀ``, ``Σ xᵢ`` and ``n`` in float64 over the real tokens / pixels of a
   calibration set. Its state is three plain tensors, so data-parallel processes can all-reduce (sum) it.
2. ``Σ = S/n − μμᵀ`` (centred by default) and its eigenvalues ``λ₁ ≥ … ≥ λ_d``.
3. With ``q = d/n``, pure noise of variance σ² has eigenvalues spread by the Marchenko–Pastur (MP) law over
   ``[λ₋, λ₊] = [σ²(1 − √q)², σ²(1 + √q)²]``. `estimate_noise_variance` finds σ² (the paper's rule: start at the
   τ-quantile of the spectrum, refine by least squares between the eigenvalue histogram and the MP density).
4. `count_outliers` keeps the eigenvalues strictly above the edge. The largest eigenvalue of pure noise fluctuates
   around λ₊ on the Tracy–Widom scale, so the default edge adds that finite-sample margin (and the uncertainty of σ²),
   which keeps pure noise at k = 0; ``edge="bare"`` is the paper's λ₊.
5. `signal_variances` undoes the upward bias of each outlier (the spiked-covariance law): the variance its direction
   carries above the noise. A parameter target below the spectrum's own cut keeps the same fraction of this signal at
   every site (`plan.signal_fraction_for_savings`).

Only torch is used; nothing here knows about ``nn.Module``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "CovarianceAccumulator",
    "NonFiniteActivationError",
    "OutlierCount",
    "count_outliers",
    "estimate_noise_variance",
    "mp_cdf",
    "mp_density",
    "mp_edges",
    "mp_quantile",
    "signal_variances",
    "tracy_widom_edge",
]

ESTIMATORS = ("mp_fit", "mp_quantile")
EDGES = ("tracy_widom", "bare")
# What one sample of the MP law's n is: a token (an image position) or a whole sequence (image).
EFFECTIVE_SAMPLES = ("tokens", "sequences")

# Quantiles of the Tracy–Widom law for real (β = 1) matrices (Bejan 2005, Table 2).
TRACY_WIDOM_1_QUANTILES = {0.90: 0.4501, 0.95: 0.9793, 0.975: 1.4538, 0.99: 2.0234}


class NonFiniteActivationError(ValueError):
    """An activation fed to a covariance accumulator held NaN or Inf."""


# --------------------------------------------------------------------------------------------------------------------
# 1. Streaming covariance
# --------------------------------------------------------------------------------------------------------------------


class CovarianceAccumulator:
    """Streams the float64 sufficient statistics of a d-dimensional activation: ``Σxxᵀ``, ``Σx`` and the count n.

    Accumulators are mergeable (``merge``) and their state is three plain tensors (``state_tensors``), so a
    distributed sum (``accelerate.utils.reduce(t, "sum")``) of each process's state gives the statistics of all data.

    Args:
        dim: feature dimension d.
        name: the site the statistics belong to; it names the site in error messages.

    Example:
        >>> acc = CovarianceAccumulator(4)
        >>> acc.update(torch.randn(2, 8, 4), mask=torch.ones(2, 8, dtype=torch.bool))
        >>> acc.count
        16
        >>> acc.covariance().shape
        torch.Size([4, 4])
    """

    def __init__(self, dim: int, name: str = "activation"):
        self.dim = int(dim)
        self.name = name
        self.sum_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        self.sum = torch.zeros(self.dim, dtype=torch.float64)
        self.n = torch.zeros((), dtype=torch.float64)  # float so it reduces with the rest; always a whole number

    @property
    def count(self) -> int:
        return int(self.n.item())

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` (shape ``(..., d)``) whose ``mask`` (shape ``x.shape[:-1]``, bool) is true.

        Whatever the input dtype (bf16/fp16 under autocast), the running sums are float64; see the comment below
        for the one product computed in float32.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"{self.name}: expected activations with last dimension {self.dim}, got {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.dim)
        if mask is not None:
            x = x[mask.reshape(-1).to(torch.bool)]
        if x.shape[0] == 0:
            return
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(dim=1).sum())
            raise NonFiniteActivationError(
                f"Non-finite activations (NaN or Inf) at site '{self.name}': {bad} of {x.shape[0]} rows. "
                "Check the model's weights and inputs, or run calibration in float32."
            )
        # Σxxᵀ = Σ(x−c)(x−c)ᵀ + c·sᵀ + s·cᵀ − n·ccᵀ for any c. With c the batch mean, the centred Gram matrix —
        # the O(n·d²) part — is small relative to the covariance itself, so float32 is accurate for it (and twice as
        # fast as float64 on CPU); the mean terms and every running sum stay in float64, so no cancellation occurs.
        gram_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(device=self.sum.device)
        total = x.sum(dim=0, dtype=torch.float64)
        centre = (total / x.shape[0]).to(gram_dtype)
        y = x.to(gram_dtype) - centre
        c = centre.double()
        mean_terms = torch.outer(c, total) + torch.outer(total, c) - x.shape[0] * torch.outer(c, c)
        self.sum_outer += (y.T @ y).double() + mean_terms
        self.sum += total
        self.n += x.shape[0]

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Add another accumulator's statistics into this one (in place) and return self."""
        if other.dim != self.dim:
            raise ValueError(f"{self.name}: cannot merge dimension {other.dim} into {self.dim}")
        self.sum_outer += other.sum_outer.to(self.sum_outer.device)
        self.sum += other.sum.to(self.sum.device)
        self.n += other.n.to(self.n.device)
        return self

    def state_tensors(self) -> list[torch.Tensor]:
        """The state as plain tensors ``[Σxxᵀ, Σx, n]``: sum them across processes to merge."""
        return [self.sum_outer, self.sum, self.n]

    def load_state_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Replace the state by ``[Σxxᵀ, Σx, n]`` (e.g. after an all-reduce)."""
        sum_outer, total, n = tensors
        self.sum_outer, self.sum, self.n = sum_outer.double(), total.double(), n.double()

    def mean(self) -> torch.Tensor:
        """The mean activation μ, shape (d,)."""
        self._require_data()
        return self.sum / self.n

    def covariance(self, centre: bool = True) -> torch.Tensor:
        """``Σ = S/n − μμᵀ`` (``centre=True``) or the second moment ``S/n``; float64, shape (d, d), symmetric."""
        self._require_data()
        cov = self.sum_outer / self.n
        if centre:
            mu = self.sum / self.n
            cov = cov - torch.outer(mu, mu)
        return (cov + cov.T) / 2

    def eigenvalues(self, centre: bool = True) -> torch.Tensor:
        """The covariance eigenvalues in float64, descending, shape (d,) (much cheaper than `eigh`)."""
        return torch.linalg.eigvalsh(self.covariance(centre)).flip(0)

    def eigh(self, centre: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigen-decomposition of the covariance in float64, sorted descending.

        Returns:
            ``(eigenvalues (d,), eigenvectors (d, d))``; column i of ``eigenvectors`` belongs to ``eigenvalues[i]``.
        """
        values, vectors = torch.linalg.eigh(self.covariance(centre))
        return values.flip(0), vectors.flip(1)

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError(
                f"No calibration samples reached site '{self.name}': the data was empty or fully masked."
            )


# --------------------------------------------------------------------------------------------------------------------
# 2. The Marchenko–Pastur law
# --------------------------------------------------------------------------------------------------------------------


def mp_edges(sigma2: float, q: float) -> tuple[float, float]:
    """Edges ``λ± = σ²(1 ± √q)²`` of the MP bulk for noise variance σ² and aspect ratio ``q = d/n``.

    Example:
        >>> mp_edges(1.0, 0.25)
        (0.25, 2.25)
    """
    root = math.sqrt(q)
    return sigma2 * (1 - root) ** 2, sigma2 * (1 + root) ** 2


def mp_density(x: torch.Tensor, sigma2: float, q: float) -> torch.Tensor:
    """The MP density ``ρ(λ) = √((λ₊ − λ)(λ − λ₋)) / (2π q σ² λ)`` on ``[λ₋, λ₊]``, zero outside.

    For ``q > 1`` this is the continuous part only (mass 1/q); the remaining ``1 − 1/q`` is an atom at 0.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    lo, hi = mp_edges(sigma2, q)
    inside = (x > lo) & (x < hi)
    safe = torch.where(inside, x, torch.ones_like(x))
    rho = torch.sqrt(((hi - safe) * (safe - lo)).clamp(min=0)) / (2 * math.pi * q * sigma2 * safe)
    return torch.where(inside, rho, torch.zeros_like(rho))


def mp_cdf(x: torch.Tensor, sigma2: float, q: float, grid: int = 1024) -> torch.Tensor:
    """The MP distribution function of the continuous part, by numerical integration (mass 1 for q ≤ 1, else 1/q)."""
    lo, hi = mp_edges(sigma2, q)
    # A sine substitution λ = lo + (hi − lo)·sin²(θ) removes the square-root singularities at both edges.
    theta = torch.linspace(0, math.pi / 2, grid + 1, dtype=torch.float64)
    lam = lo + (hi - lo) * torch.sin(theta) ** 2
    integrand = mp_density(lam, sigma2, q) * (hi - lo) * torch.sin(2 * theta)
    integrand[0] = integrand[-1] = 0.0
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(integrand, theta)])
    return torch.from_numpy(_interp(torch.as_tensor(x, dtype=torch.float64), lam, cdf))


def mp_quantile(p: float, sigma2: float, q: float) -> float:
    """The p-quantile of the continuous MP part, normalised to mass 1 (by bisection on `mp_cdf`)."""
    lo, hi = mp_edges(sigma2, q)
    grid = torch.linspace(lo, hi, 4097, dtype=torch.float64)
    cdf = mp_cdf(grid, sigma2, q)
    cdf = cdf / cdf[-1]
    index = int(torch.searchsorted(cdf, torch.tensor([p], dtype=torch.float64)).clamp(1, len(grid) - 1))
    # Linear interpolation inside the bracketing grid cell.
    c0, c1 = float(cdf[index - 1]), float(cdf[index])
    t = 0.0 if c1 == c0 else (p - c0) / (c1 - c0)
    return float(grid[index - 1] + t * (grid[index] - grid[index - 1]))


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor):
    import numpy as np

    return np.interp(x.numpy(), xp.numpy(), fp.numpy())


# --------------------------------------------------------------------------------------------------------------------
# 3. Noise variance σ²
# --------------------------------------------------------------------------------------------------------------------


def _positive(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Eigenvalues that are not numerically zero (n < d leaves d − n exact zeros)."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten().clamp(min=0)
    if lam.numel() == 0:
        raise ValueError("The spectrum is empty.")
    top = float(lam.max())
    if top <= 0 or not math.isfinite(top):
        raise ValueError(f"The spectrum has no positive finite eigenvalue (max {top}).")
    return lam[lam > top * 1e-10 * lam.numel()]


def estimate_noise_variance(
    eigenvalues: torch.Tensor,
    n_samples: int,
    method: str = "mp_fit",
    quantile: float = 0.5,
    n_bins: int | None = None,
) -> float:
    """Estimate the noise variance σ² of a sample-covariance spectrum.

    Methods:
        ``"mp_fit"`` (the paper's rule): start at ``σ₀² = Quantile(λ, τ)``, then choose σ² in ``[σ₀²/4, 4σ₀²]``
        minimising the squared L2 distance between the eigenvalue histogram (as a density over all d eigenvalues)
        and the MP density, each bin compared with the MP mass that falls in it. When the best σ² lies on the edge of
        that range the spectrum has no MP-shaped bulk (real activations often follow a smooth power law) and the
        ``mp_quantile`` value is returned instead; `count_outliers` records the switch in ``OutlierCount.note``.
        ``"mp_quantile"`` (robust alternative): ``σ² = Quantile(λ, τ) / Quantile_MP(τ; σ²=1, q)`` — the τ-quantile of
        the spectrum matched to the same quantile of the unit MP law (the "median divided by the MP median" rule).

    Args:
        eigenvalues: the spectrum (any order), shape (d,).
        n_samples: the number of samples n behind the covariance (``q = d/n``).
        method: ``"mp_fit"`` or ``"mp_quantile"``.
        quantile: τ ∈ (0, 1), the quantile that starts (or, for ``mp_quantile``, defines) the estimate.
        n_bins: histogram bins over the fitting window; default chosen so the MP bulk spans about √d bins.

    Returns:
        σ² as a float.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(4000, 100, generator=g, dtype=torch.float64) * 2.0
        >>> lam = torch.linalg.eigvalsh(x.T @ x / 4000)
        >>> round(estimate_noise_variance(lam, 4000), 1)
        4.0
    """
    return _noise_variance(eigenvalues, n_samples, method, quantile, n_bins)[0]


def _noise_variance(eigenvalues, n_samples, method, quantile, n_bins) -> tuple[float, str, str]:
    """σ², the estimator that produced it, and a note when that is not the one requested."""
    if method not in ESTIMATORS:
        raise ValueError(f"Unknown noise-variance estimator '{method}'; choose one of {ESTIMATORS}.")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    lam_all = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten()
    d = lam_all.numel()
    q = d / n_samples
    lam = _positive(lam_all)
    sigma0 = float(torch.quantile(lam, quantile))
    quantile_rule = sigma0 / mp_quantile(quantile, 1.0, q)
    if method == "mp_quantile":
        return quantile_rule, method, ""
    sigma2, at_bound = _fit_mp_histogram(lam, d, q, sigma0, n_bins)
    if at_bound:
        # No MP bulk to fit: the robust quantile rule still gives a noise level, and the report says so.
        return quantile_rule, "mp_quantile", "mp_fit ended on its search bound (no MP-shaped bulk); used mp_quantile"
    return sigma2, method, ""


def _fit_mp_histogram(lam: torch.Tensor, d: int, q: float, sigma0: float, n_bins: int | None) -> tuple[float, bool]:
    """Least-squares match of the eigenvalue histogram to the MP density over σ² ∈ [σ₀²/4, 4σ₀²].

    Returns:
        ``(σ², at_bound)``; ``at_bound`` is true when the best σ² lies on the edge of the search range, which happens
        when the spectrum has no MP-shaped bulk at all (e.g. a smooth power law): the L2 loss then keeps falling as
        the MP curve moves away from the data, and the "fit" says nothing about the noise level.
    """
    root = math.sqrt(q)
    # One fixed window for every candidate σ², wide enough to hold the whole bulk of any of them.
    lo = 0.25 * sigma0 * (1 - root) ** 2 if q != 1 else 0.0
    hi = 4.0 * sigma0 * (1 + root) ** 2
    if n_bins is None:
        bulk_width = sigma0 * ((1 + root) ** 2 - (1 - root) ** 2)
        n_bins = int(min(2000, max(20, math.ceil((hi - lo) / bulk_width * max(4.0, math.sqrt(d))))))
    edges = torch.linspace(lo, hi, n_bins + 1, dtype=torch.float64)
    width = float(edges[1] - edges[0])
    counts = torch.histc(lam.clamp(max=hi * 2), bins=n_bins, min=lo, max=hi)
    observed = counts / (d * width)  # a density over all d eigenvalues, like the MP law's continuous part

    def loss(sigma2: float) -> float:
        cdf = mp_cdf(edges, sigma2, q)
        expected = (cdf[1:] - cdf[:-1]) / width  # for q > 1 the continuous part already carries mass 1/q
        return float(((observed - expected) ** 2).sum())

    # Coarse log-grid search, then golden-section refinement in the best cell: the loss is not convex far away.
    grid = torch.logspace(math.log10(sigma0 / 4), math.log10(4 * sigma0), 121, dtype=torch.float64).tolist()
    values = [loss(s) for s in grid]
    best = min(range(len(grid)), key=values.__getitem__)
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    c, e = b - golden * (b - a), a + golden * (b - a)
    fc, fe = loss(c), loss(e)
    for _ in range(40):
        if fc < fe:
            b, e, fe = e, c, fc
            c = b - golden * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, e, fe
            e = a + golden * (b - a)
            fe = loss(e)
    return (a + b) / 2, best in (0, len(grid) - 1)


# --------------------------------------------------------------------------------------------------------------------
# 4. The outlier count k
# --------------------------------------------------------------------------------------------------------------------


def tracy_widom_edge(sigma2: float, d: int, n: int, confidence: float = 0.99) -> float:
    """The value the largest eigenvalue of pure noise stays below with probability ``confidence``.

    Johnstone (2001): for a d×n real Gaussian matrix X, ``λ_max(XXᵀ) ≈ μ + s·TW₁`` with
    ``μ = (√(n−1) + √d)²`` and ``s = (√(n−1) + √d)(1/√(n−1) + 1/√d)^{1/3}``; our covariance is ``σ²XXᵀ/n``.
    The edge is always at least the bare ``λ₊``.
    """
    if confidence not in TRACY_WIDOM_1_QUANTILES:
        raise ValueError(f"confidence must be one of {sorted(TRACY_WIDOM_1_QUANTILES)}, got {confidence}")
    m = max(n - 1, 1)
    mu = (math.sqrt(m) + math.sqrt(d)) ** 2
    scale = (math.sqrt(m) + math.sqrt(d)) * (1 / math.sqrt(m) + 1 / math.sqrt(d)) ** (1 / 3)
    edge = sigma2 * (mu + TRACY_WIDOM_1_QUANTILES[confidence] * scale) / n
    return max(edge, mp_edges(sigma2, d / n)[1])


@dataclass
class OutlierCount:
    """What `count_outliers` decided, and why (kept for reports and model cards)."""

    k: int  # eigenvalues strictly above `threshold`
    d: int
    n_samples: int
    q: float
    sigma2: float
    lambda_minus: float
    lambda_plus: float  # the bare MP edge σ²(1 + √q)²
    threshold: float  # the edge actually used (λ₊ plus the finite-sample margin, or λ₊)
    retained_variance: float  # Σ_{i≤k} λᵢ / Σ λᵢ
    estimator: str  # the estimator that produced sigma2 (see `note` when it is not the one requested)
    quantile: float
    edge: str
    note: str = ""
    # Below 1 when a parameter target lowered k to the fewest outliers holding this fraction of the signal
    # (`hf_rmtkd.plan.keep_signal_fraction`); cuts that keep whole groups (attention heads) keep the same fraction.
    signal_fraction: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def count_outliers(
    eigenvalues: torch.Tensor,
    n_samples: int,
    *,
    estimator: str = "mp_fit",
    quantile: float = 0.5,
    edge: str = "tracy_widom",
    confidence: float = 0.99,
    n_bins: int | None = None,
) -> OutlierCount:
    """Count the eigenvalues above the MP bulk: the number k of signal directions RMT-KD keeps.

    Args:
        eigenvalues: the covariance spectrum, shape (d,), any order.
        n_samples: n behind the covariance (tokens, pixels, or sequences when tokens are too correlated).
        estimator: how σ² is estimated (`estimate_noise_variance`).
        quantile: τ for the estimator (the paper's compression knob: larger τ, larger σ², fewer directions kept).
        edge: ``"tracy_widom"`` (default) adds the finite-sample margin: the Tracy–Widom ``confidence`` quantile of
            the largest noise eigenvalue, widened by the uncertainty of σ² (from the spread of the bulk). ``"bare"``
            is the paper's λ₊, which calls pure noise "signal" a good part of the time.
        confidence: the Tracy–Widom level of the margin.
        n_bins: passed to the ``mp_fit`` estimator.

    Returns:
        An `OutlierCount` (k is not clamped; the planner applies ``min_rank``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(5000, 50, generator=g, dtype=torch.float64)
        >>> x[:, 0] *= 3.0  # one spike, variance 9
        >>> count_outliers(torch.linalg.eigvalsh(x.T @ x / 5000), 5000).k
        1
    """
    if edge not in EDGES:
        raise ValueError(f"Unknown edge '{edge}'; choose one of {EDGES}.")
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten().sort(descending=True).values
    d = lam.numel()
    if n_samples < d:
        warnings.warn(
            f"Only {n_samples} samples for a {d}-dimensional covariance (n < d): {d - n_samples} eigenvalues are "
            "exactly zero and the MP fit uses the rest. Use more calibration data for a reliable count.",
            stacklevel=2,
        )
    q = d / n_samples
    sigma2, estimator, note = _noise_variance(lam, n_samples, estimator, quantile, n_bins)
    lam_minus, lam_plus = mp_edges(sigma2, q)
    threshold = lam_plus
    if edge == "tracy_widom":
        threshold = tracy_widom_edge(sigma2, d, n_samples, confidence) + _sigma2_margin(lam, sigma2, q, lam_plus)
    k = int((lam > threshold).sum())
    total = float(lam.clamp(min=0).sum())
    retained = float(lam[:k].clamp(min=0).sum()) / total if total > 0 else 0.0
    return OutlierCount(
        k=k, d=d, n_samples=int(n_samples), q=q, sigma2=sigma2, lambda_minus=lam_minus, lambda_plus=lam_plus,
        threshold=threshold, retained_variance=retained, estimator=estimator, quantile=quantile, edge=edge, note=note,
    )


def _sigma2_margin(lam: torch.Tensor, sigma2: float, q: float, lam_plus: float) -> float:
    """Widen the edge by two standard errors of σ², estimated from the bulk eigenvalues actually observed.

    σ² is fitted to d eigenvalues, so it is uncertain by about (bulk spread)/√(bulk size); an edge placed exactly at
    σ²(1+√q)² inherits that error and would let the top noise eigenvalue through.
    """
    bulk = lam[(lam > 0) & (lam <= lam_plus)]
    if bulk.numel() < 2:
        return 0.0
    relative_error = float(bulk.std()) / float(bulk.mean()) / math.sqrt(bulk.numel())
    return 2.0 * relative_error * lam_plus


def signal_variances(eigenvalues: torch.Tensor, outliers: OutlierCount) -> torch.Tensor:
    """The variance each outlier direction carries above the noise floor, undoing the sample bias (descending).

    In the spiked covariance model (noise σ²I plus a spike of population variance ℓσ², ℓ > 1 + √q), the sample
    eigenvalue lands at ``λ = σ²·ℓ(1 + q/(ℓ − 1))`` (Baik–Ben Arous–Péché), above the spike itself. Solving for ℓ,
    ``ℓ² − (x + 1 − q)ℓ + x = 0`` with ``x = λ/σ²`` (the larger root), gives the direction's signal variance
    ``(ℓ − 1)σ²``. Eigenvalues inside the bulk carry none, so only the k outliers are returned.

    Args:
        eigenvalues: the spectrum the count was made on, shape (d,), any order.
        outliers: its `count_outliers` result.

    Returns:
        Shape (k,) float64, non-negative, for the k largest eigenvalues.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(20000, 50, generator=g, dtype=torch.float64)
        >>> x[:, 0] *= 3.0  # a spike of variance 9: signal 8 above the noise variance 1
        >>> lam = torch.linalg.eigvalsh(x.T @ x / 20000)
        >>> abs(float(signal_variances(lam, count_outliers(lam, 20000))[0]) - 8.0) < 0.2
        True
    """
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten().sort(descending=True).values
    x = lam[: outliers.k] / outliers.sigma2
    b = x + 1 - outliers.q
    spike = (b + torch.sqrt((b * b - 4 * x).clamp_min(0))) / 2
    return (spike - 1).clamp_min(0) * outliers.sigma2
