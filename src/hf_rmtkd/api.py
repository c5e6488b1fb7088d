"""The one-call entry points: `analyze` (spectra only) and `compress` (one-shot cut, no training)."""

from __future__ import annotations

import copy

from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from .calibration import SiteMeasurement, calibrate
from .cut import apply_plan
from .modeling.modeling_rmtkd import rmtkd_class_for
from .plan import DEFAULT_KINDS, plan_reductions
from .reductions import cut_residual_stream
from .report import SiteSpectrum, SpectralReport

__all__ = ["analyze", "base_of", "compress", "to_report"]

logger = logging.get_logger(__name__)


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


def compress(
    model: nn.Module,
    data,
    *,
    targets: list[str] | str | None = None,
    kinds: tuple[str, ...] | list[str] = DEFAULT_KINDS,
    min_rank: int = 8,
    min_keep_ratio: float = 0.0,
    ffn_method: str = "select",
    vocabulary: list[int] | None = None,
    head_signal_fraction: float | None = None,
    centre: bool = True,
    estimator: str = "mp_fit",
    quantile: float = 0.5,
    edge: str = "tracy_widom",
    effective_samples: str = "tokens",
    max_tokens: int | None = None,
    batch_size: int = 32,
    collate_fn=None,
    inplace: bool = False,
    progress: bool = True,
) -> PreTrainedModel:
    """One-shot RMT-KD cut, no training: calibrate → plan → cut every site to its outlier count.

    Args:
        model: a transformers model (or an RMTKD model, which is cut further).
        data: calibration data, as for `analyze`.
        targets: restrict to sites by role, glob or regex.
        kinds: reduction kinds allowed (``ffn_width``, ``low_rank``, ``attention_heads``, ``embedding``).
            ``attention_heads`` drops heads only under a parameter target (`RMTKDTrainer`) or with
            ``head_signal_fraction``; otherwise a one-shot cut keeps every head that carries signal and factors the
            attention output instead. ``residual``
            (post-LayerNorm encoders) first narrows the residual stream between every two LayerNorms
            (`reductions.residual`).
        min_rank: smallest rank / width installed.
        min_keep_ratio: smallest kept fraction k/d.
        ffn_method: ``"select"`` (whole neurons + least-squares refit, default) or ``"fold"``.
        vocabulary: token ids whose embedding codes an ``embedding`` cut stores, e.g.
            ``reductions.token_ids_used(train_set)`` plus the tokenizer's special ids; every other token reads its
            nearest kept token's code. None (default) stores every token's.
        head_signal_fraction: with ``attention_heads``, keep of each attention output the fewest heads holding this
            fraction of its signal (`RMTKDTrainingArguments.head_signal_fraction`). None (default): every head with
            signal.
        centre, estimator, quantile, edge, effective_samples, max_tokens, batch_size, collate_fn, progress:
            as for `analyze`.
        inplace: cut ``model`` itself; by default a copy is cut and ``model`` is left untouched.

    Returns:
        An RMTKD model (``config.model_type == "rmtkd"``) whose config holds the reduction map and the spectral
        summary; ``model.rmtkd_report`` is the full `SpectralReport`, ``model.rmtkd_plan`` the `Plan`.

    Example:
        >>> small = hf_rmtkd.compress(model, calibration_set)  # doctest: +SKIP
        >>> small.save_pretrained("out/")  # loads back with AutoModelForSequenceClassification  # doctest: +SKIP
    """
    if not inplace:
        model = copy.deepcopy(model)
    base = base_of(model)
    stream = {}
    if "residual" in kinds:  # narrow the stream first, then measure and cut inside the narrowed layers
        stream, _ = cut_residual_stream(base, data, estimator=estimator, quantile=quantile, edge=edge,
                                        effective_samples=effective_samples, min_rank=min_rank, max_tokens=max_tokens,
                                        batch_size=batch_size, collate_fn=collate_fn, progress=progress)
    measurements = calibrate(
        base, data, targets=targets, max_tokens=max_tokens, batch_size=batch_size, collate_fn=collate_fn,
        progress=progress, centre=centre, estimator=estimator, quantile=quantile, edge=edge,
        effective_samples=effective_samples,
    )
    plan = plan_reductions(measurements, base, kinds=kinds, min_rank=min_rank, min_keep_ratio=min_keep_ratio,
                           vocabulary=vocabulary, head_fraction=head_signal_fraction)
    added = {**stream, **apply_plan(base, plan, measurements, ffn_method=ffn_method)}
    settings = dict(centre=centre, estimator=estimator, quantile=quantile, edge=edge,
                    effective_samples=effective_samples, max_tokens=max_tokens, min_rank=min_rank,
                    ffn_method=ffn_method)
    report = to_report(measurements, settings, model_name=getattr(base.config, "_name_or_path", None))
    if base is model:
        result = rmtkd_class_for(base).from_base(base, added, spectral_summary=report.summary())
    else:  # already an RMTKD model: extend its map
        result = model
        result.config.reductions = {**result.config.reductions, **added}
        result.config.spectral_summary = report.summary()
    result.rmtkd_report, result.rmtkd_plan = report, plan
    logger.info(f"RMT-KD cut {len(plan.cuts)} sites, saving {plan.params_saved:,} parameters.")
    return result
