"""The spectral core on synthetic spiked covariances Σ = σ²I + Σ θᵢuᵢuᵢᵀ, for d/n from 0.01 to 0.5 (and n < d)."""

import math
import warnings

import pytest
import torch

from hf_rmtkd.spectrum import (
    CovarianceAccumulator,
    NonFiniteActivationError,
    count_outliers,
    estimate_noise_variance,
    mp_cdf,
    mp_density,
    mp_edges,
    mp_quantile,
    signal_variances,
)

SHAPES = [(50, 5000), (100, 1000), (200, 800), (150, 300)]  # q = 0.01, 0.1, 0.25, 0.5


def spiked_samples(d, n, sigma2, spikes, generator):
    """n samples of N(0, σ²I + Σ θᵢuᵢuᵢᵀ) with random orthonormal uᵢ; returns (n, d) float64."""
    x = torch.randn(n, d, generator=generator, dtype=torch.float64) * math.sqrt(sigma2)
    if spikes:
        u, _ = torch.linalg.qr(torch.randn(d, len(spikes), generator=generator, dtype=torch.float64))
        z = torch.randn(n, len(spikes), generator=generator, dtype=torch.float64)
        x = x + (z * torch.tensor(spikes, dtype=torch.float64).sqrt()) @ u.T
    return x


def spectrum_of(x):
    acc = CovarianceAccumulator(x.shape[1])
    acc.update(x)
    return acc.eigh(centre=True)[0], acc.count


def test_mp_edges_and_density_integrate_to_one():
    lo, hi = mp_edges(2.0, 0.25)
    assert (lo, hi) == pytest.approx((0.5, 4.5))
    grid = torch.linspace(lo, hi, 200001, dtype=torch.float64)
    assert float(torch.trapezoid(mp_density(grid, 2.0, 0.25), grid)) == pytest.approx(1.0, abs=2e-3)
    assert float(mp_cdf(torch.tensor([hi]), 2.0, 0.25)[0]) == pytest.approx(1.0, abs=1e-4)
    top = torch.tensor([mp_edges(1.0, 2.0)[1]])
    assert float(mp_cdf(top, 1.0, 2.0)[0]) == pytest.approx(0.5, abs=1e-4)  # q > 1: the continuous part has mass 1/q
    median = mp_quantile(0.5, 1.0, 0.25)
    assert float(mp_cdf(torch.tensor([median]), 1.0, 0.25)[0]) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("d,n", SHAPES)
@pytest.mark.parametrize("estimator", ["mp_fit", "mp_quantile"])
def test_strong_spikes_found_and_sigma2_recovered(d, n, estimator):
    q = d / n
    sigma2 = 0.7
    bbp = sigma2 * math.sqrt(q)  # population spikes above this leave the bulk
    spikes = [40 * bbp, 20 * bbp, 10 * bbp]
    for seed in range(3):
        lam, count = spectrum_of(spiked_samples(d, n, sigma2, spikes, torch.Generator().manual_seed(seed)))
        result = count_outliers(lam, count, estimator=estimator)
        assert result.k == len(spikes), (seed, result)
        assert result.sigma2 == pytest.approx(sigma2, rel=0.05)
        assert result.threshold >= result.lambda_plus
        assert 0 < result.retained_variance < 1


@pytest.mark.parametrize("d,n", [(200, 800), (150, 300)])  # q = 0.25, 0.5: the sample bias is largest
def test_signal_variances_undo_the_sample_bias_of_spikes(d, n):
    """Averaged over seeds, the spiked-model inversion recovers the population spikes θ; the raw excess λ − σ²
    overstates them."""
    sigma2, q = 0.7, d / n
    spikes = torch.tensor([20 * sigma2 * math.sqrt(q), 4 * sigma2 * math.sqrt(q)], dtype=torch.float64)
    found, raw = [], []
    for seed in range(20):
        lam, count = spectrum_of(spiked_samples(d, n, sigma2, spikes.tolist(), torch.Generator().manual_seed(seed)))
        result = count_outliers(lam, count)
        assert result.k == 2
        found.append(signal_variances(lam, result))
        raw.append(lam.sort(descending=True).values[:2] - result.sigma2)
    found, raw = torch.stack(found).mean(0), torch.stack(raw).mean(0)
    assert torch.allclose(found, spikes, rtol=0.06)
    assert ((found - spikes).abs() < (raw - spikes).abs()).all()


@pytest.mark.parametrize("d,n", SHAPES)
def test_pure_noise_gives_no_outliers(d, n):
    seeds = 40
    zero = 0
    for seed in range(seeds):
        lam, count = spectrum_of(spiked_samples(d, n, 1.3, [], torch.Generator().manual_seed(100 + seed)))
        zero += count_outliers(lam, count).k == 0
    assert zero / seeds >= 0.95


def test_bare_edge_often_calls_noise_signal():
    """The reason for the default margin: the paper's bare λ₊ is crossed by the top noise eigenvalue regularly."""
    bare = margin = 0
    for seed in range(40):
        lam, count = spectrum_of(spiked_samples(200, 2000, 1.0, [], torch.Generator().manual_seed(seed)))
        bare += count_outliers(lam, count, edge="bare").k > 0
        margin += count_outliers(lam, count).k > 0
    assert bare >= 4  # measured 8 of 40 with these seeds
    assert margin == 0


@pytest.mark.parametrize("d,n", SHAPES)
def test_spikes_below_bbp_threshold_not_found(d, n):
    bbp = math.sqrt(d / n)
    found = 0
    for seed in range(5):
        x = spiked_samples(d, n, 1.0, [0.3 * bbp, 0.2 * bbp], torch.Generator().manual_seed(seed))
        lam, count = spectrum_of(x)
        found += count_outliers(lam, count).k
    assert found == 0


def test_fewer_samples_than_dimensions_warns_and_works():
    d, n = 300, 150
    lam, count = spectrum_of(spiked_samples(d, n, 1.0, [60.0, 30.0], torch.Generator().manual_seed(0)))
    assert (lam.abs() < 1e-8).sum() >= d - n  # the zero eigenvalues of a rank-deficient covariance
    with pytest.warns(UserWarning, match="n < d"):
        result = count_outliers(lam, count)
    assert result.k == 2
    assert result.sigma2 == pytest.approx(1.0, rel=0.05)


def test_higher_quantile_keeps_fewer_directions():
    """τ is the paper's compression knob: a larger σ² start gives a larger edge."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 100, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, 100, dtype=torch.float64)
    lam, count = spectrum_of(x)
    ks = [count_outliers(lam, count, estimator="mp_quantile", quantile=t).k for t in (0.3, 0.5, 0.7)]
    assert ks[0] > ks[1] > ks[2]


def test_merged_accumulators_equal_one_over_all_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 16, generator=g, dtype=torch.float64) + 5.0  # a large mean: no cancellation allowed
    mask = torch.rand(3, 40, generator=g) > 0.3
    whole = CovarianceAccumulator(16)
    whole.update(x, mask)
    parts = [CovarianceAccumulator(16) for _ in range(3)]
    for i, part in enumerate(parts):
        part.update(x[i], mask[i])
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.count == whole.count == int(mask.sum())
    torch.testing.assert_close(merged.covariance(), whole.covariance(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.mean(), whole.mean(), rtol=1e-12, atol=1e-12)
    # The state is plain tensors: summing them (what an all-reduce does) is a merge.
    summed = CovarianceAccumulator(16)
    summed.load_state_tensors([sum(ts) for ts in zip(*(p.state_tensors() for p in parts[:1]), strict=True)])
    assert summed.count == merged.count


def test_statistics_are_float64_whatever_the_input_dtype():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 300, 8, generator=g, dtype=torch.float64) * 0.01 + 100.0  # mean 10⁴× the spread
    exact, low = CovarianceAccumulator(8), CovarianceAccumulator(8)
    for batch in x:
        exact.update(batch)
        low.update(batch.float())
    assert low.covariance().dtype == torch.float64
    # float32 inputs are rounded (to ~1e-5 of 100 here); the statistics add no cancellation on top of that.
    torch.testing.assert_close(low.covariance(), exact.covariance(), rtol=0.02, atol=1e-7)
    bf16 = CovarianceAccumulator(8)
    bf16.update(torch.randn(64, 8).to(torch.bfloat16))
    assert bf16.covariance().dtype == torch.float64


def test_non_finite_activation_names_the_site():
    acc = CovarianceAccumulator(4, name="bert.encoder.layer.3.output.dense")
    x = torch.randn(10, 4)
    x[2, 1] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"bert\.encoder\.layer\.3\.output\.dense"):
        acc.update(x)


def test_empty_accumulator_and_bad_options_raise():
    with pytest.raises(ValueError, match="No calibration samples"):
        CovarianceAccumulator(4, name="site.x").covariance()
    lam = torch.linspace(0.5, 1.5, 10)
    with pytest.raises(ValueError, match="estimator"):
        estimate_noise_variance(lam, 100, method="mean")
    with pytest.raises(ValueError, match="quantile"):
        estimate_noise_variance(lam, 100, quantile=1.5)
    with pytest.raises(ValueError, match="edge"):
        count_outliers(lam, 100, edge="loose")


def test_zero_spectrum_raises():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no positive"):
            count_outliers(torch.zeros(5), 100)


def test_spectrum_without_mp_bulk_falls_back_to_the_quantile_rule():
    """A smooth power-law spectrum (like real FFN activations) has no bulk: the histogram fit runs to its search
    bound, so the count uses the quantile rule and says so."""
    d, n = 400, 20000
    lam = torch.logspace(1, -4, d, dtype=torch.float64)
    result = count_outliers(lam, n)
    assert result.estimator == "mp_quantile" and "search bound" in result.note
    assert result.sigma2 == pytest.approx(estimate_noise_variance(lam, n, "mp_quantile"))
    clean, count = spectrum_of(spiked_samples(200, 4000, 1.0, [5.0], torch.Generator().manual_seed(0)))
    assert count_outliers(clean, count).note == ""
