"""The one-call entry points: `analyze` (spectra only) and `compress` (one-shot cut, no training)."""

from __future__ import annotations

from torch import nn

from .calibration import SiteMeasurement, calibrate
from .report import SiteSpectrum, SpectralReport

__all__ = ["analyze", "to_report"]


def base_of(model: nn.Module) -> nn.Module:
    """The base transformers model inside an RMTKD wrapper (paths in reduction maps are relative to it)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "rmtkd" and hasattr(model, "model"):
        return model.model
    return model


def to_report(measurements: list[SiteMeasurement], settings: dict, model_name: str | None = None) -> SpectralReport:
    """Condense measurements (which hold eigenvectors and raw sums) into a JSON-able `SpectralReport`."""
    sites = [
        SiteSpectrum(
            name=m.site.name, role=m.site.role, layer=m.site.layer, d=m.d, n=m.statistics.count,
            n_sequences=m.n_sequences, eigenvalues=m.eigenvalues.tolist(), outliers=m.outliers, centred=m.centred,
        )
        for m in measurements
    ]
    return SpectralReport(sites=sites, settings=settings, model_name=model_name)


def analyze(
    model: nn.Module,
    data,
    *,
    targets: list[str] | str | None = None,
    centre: bool = True,
    estimator: str = "mp_fit",
    quantile: float = 0.5,
    edge: str = "tracy_widom",
    effective_samples: str = "tokens",
    max_tokens: int | None = None,
    batch_size: int = 32,
    collate_fn=None,
    accelerator=None,
    progress: bool = True,
) -> SpectralReport:
    """Measure the covariance spectrum at every site of ``model`` on calibration ``data``; changes nothing.

    Args:
        model: a transformers model (BERT-family encoders, ViT, ResNet, LLaMA by role table; any other through its
            ``nn.Linear`` inputs) or an RMTKD model.
        data: a DataLoader, a ``datasets.Dataset`` of model inputs (``input_ids``, ``attention_mask``, ... or
            ``pixel_values``), or an iterable of dict batches. Padding is masked with ``attention_mask``.
        targets: restrict to sites by role (``"ffn_inner"``), glob or regex over site names.
        centre: subtract the mean activation (the paper assumes mean-zero activations; centring makes it so).
        estimator: σ² estimator, ``"mp_fit"`` (the paper's quantile start + histogram fit) or ``"mp_quantile"``.
        quantile: τ, the quantile that starts the σ² estimate (larger τ keeps fewer directions).
        edge: ``"tracy_widom"`` (λ₊ plus the finite-sample margin) or ``"bare"`` (the paper's λ₊).
        effective_samples: n for the MP law: ``"tokens"`` (default) or ``"sequences"`` (conservative).
        max_tokens: cap on real tokens (or pixels) read per site.
        batch_size, collate_fn: batching of a ``datasets.Dataset``.
        accelerator: sums statistics across data-parallel processes.
        progress: show a progress bar.

    Returns:
        A `SpectralReport` (``.sites``, ``.table()``, ``.to_json(path)``, ``.plot(dir)``).

    Example:
        >>> import hf_rmtkd
        >>> report = hf_rmtkd.analyze(model, tokenized_calibration_set)  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """
    settings = dict(centre=centre, estimator=estimator, quantile=quantile, edge=edge,
                    effective_samples=effective_samples, max_tokens=max_tokens)
    measurements = calibrate(
        base_of(model), data, targets=targets, max_tokens=max_tokens, batch_size=batch_size,
        collate_fn=collate_fn, accelerator=accelerator, progress=progress, centre=centre, estimator=estimator,
        quantile=quantile, edge=edge, effective_samples=effective_samples,
    )
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    return to_report(measurements, settings, model_name=name)
