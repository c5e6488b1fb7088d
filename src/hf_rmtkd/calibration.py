"""Calibration: run a model over a small data set and measure the covariance spectrum at every site.

Forward hooks capture each site's tensor, padding tokens are masked out with the batch's ``attention_mask``, the
sums stream into float64 `CovarianceAccumulator`s under ``torch.no_grad()``, and in data-parallel runs the sums are
all-reduced once at the end, so every process holds the statistics of all processes' data.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> import torch
    >>> model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=32))
    >>> batches = [{"input_ids": torch.randint(0, 50, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}]
    >>> stats = collect_statistics(model, batches, find_sites(model), progress=False)
    >>> stats.accumulators["encoder.layer.0.output.dense"].count
    48
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from transformers.utils import logging

from .architectures import Site, find_sites
from .spectrum import EFFECTIVE_SAMPLES, CovarianceAccumulator, OutlierCount, count_outliers

__all__ = [
    "CalibrationStatistics", "SiteMeasurement", "calibrate", "collect_statistics", "iterate_batches", "measure_sites",
    "recount",
]

logger = logging.get_logger(__name__)


@dataclass
class CalibrationStatistics:
    """What one calibration pass collected: an accumulator per site and the number of sequences (or images) seen."""

    accumulators: dict[str, CovarianceAccumulator]
    n_sequences: int = 0


@dataclass
class SiteMeasurement:
    """One site's statistics, spectrum and outlier count: everything the planner and the surgery need."""

    site: Site
    statistics: CovarianceAccumulator
    eigenvalues: torch.Tensor  # (d,) float64, descending
    outliers: OutlierCount | None  # None only inside `measure_sites`, before the count
    n_sequences: int
    centred: bool

    @cached_property
    def eigenvectors(self) -> torch.Tensor:
        """(d, d) float64, column i belongs to ``eigenvalues[i]``; computed on first use (only cut sites need it)."""
        return self.statistics.eigh(centre=self.centred)[1]

    def with_outliers(self, outliers: OutlierCount) -> SiteMeasurement:
        """This measurement with another outlier count; the statistics and eigenvectors (once computed) are shared."""
        twin = copy.copy(self)
        twin.outliers = outliers
        return twin

    @property
    def d(self) -> int:
        return self.eigenvalues.numel()

    @property
    def k(self) -> int:
        return self.outliers.k


def _model_input_names(model: nn.Module) -> tuple[set[str], bool]:
    """The named arguments of ``model.forward``, and whether it also takes ``**kwargs``."""
    parameters = inspect.signature(model.forward).parameters.values()
    variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    named = {p.name for p in parameters if p.kind not in variadic}
    return named, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _pad_collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack a list of examples, right-padding variable-length sequences (``attention_mask`` pads with 0)."""
    batch = {}
    for key in features[0]:
        values = [torch.as_tensor(f[key]) for f in features]
        if values[0].dim() >= 1 and len({v.shape for v in values}) > 1:
            pad = 0 if key in ("attention_mask", "token_type_ids") else pad_token_id
            batch[key] = nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=pad)
        else:
            batch[key] = torch.stack(values)
    return batch


def iterate_batches(model: nn.Module, data, batch_size: int = 32, collate_fn=None) -> Iterator[dict]:
    """Yield dict batches of model inputs from a DataLoader, a ``datasets.Dataset`` or an iterable of batches.

    A ``datasets.Dataset`` keeps only the columns ``model.forward`` accepts (``labels`` are dropped: calibration
    needs no loss) and is padded per batch.
    """
    named, any_keyword = _model_input_names(model)
    if hasattr(data, "column_names") and hasattr(data, "select"):  # a datasets.Dataset
        # Columns are kept only when forward names them: text, ids and other metadata columns are dropped.
        keep = [c for c in data.column_names if c not in ("labels", "label") and c in named]
        if not keep:
            raise ValueError(
                f"The calibration dataset has no column {type(model).__name__}.forward accepts "
                f"(columns: {data.column_names}). Tokenize it first (input_ids/attention_mask) or provide "
                "pixel_values."
            )
        data = data.select_columns(keep).with_format("torch")
        pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
        collate_fn = collate_fn or (lambda features: _pad_collate(features, pad_token_id))
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate_fn)
    for batch in data:
        if not isinstance(batch, dict):
            batch = dict(batch)  # BatchEncoding and other mappings
        yield {k: v for k, v in batch.items() if k not in ("labels", "label") and (any_keyword or k in named)}


def _as_rows(x: torch.Tensor, site: Site, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bring a captured tensor to (samples, features) and the matching sample mask."""
    if site.channel_dim == 1:  # NCHW: every pixel of every image is a sample of the channel vector
        return x.movedim(1, -1), None
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x, mask.bool()
    return x, None


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    data,
    sites: list[Site],
    *,
    max_tokens: int | None = None,
    batch_size: int = 32,
    collate_fn=None,
    accelerator=None,
    progress: bool = True,
) -> CalibrationStatistics:
    """Run ``model`` over ``data`` and accumulate the float64 covariance statistics of every site.

    Args:
        model: the model to run (its forward is called with each batch); site paths are relative to it.
        data: a DataLoader, a ``datasets.Dataset`` of model inputs, or an iterable of dict batches.
        sites: the sites to measure (`find_sites`).
        max_tokens: stop after this many real tokens (or pixels) at the first site; None reads all data.
        batch_size: batch size when ``data`` is a ``datasets.Dataset``.
        collate_fn: collate function for a ``datasets.Dataset`` (default: pad to the longest sequence).
        accelerator: an ``accelerate.Accelerator``; with several processes the statistics are summed across them.
        progress: show a progress bar.

    Returns:
        `CalibrationStatistics` (one accumulator per site name).
    """
    if not sites:
        raise ValueError("No site to calibrate: pass at least one Site (see hf_rmtkd.architectures.find_sites).")
    modules = dict(model.named_modules())
    missing = [s.hook for s in sites if s.hook not in modules]
    if missing:
        raise KeyError(f"Sites name modules {type(model).__name__} does not have: {missing}")

    state: dict = {"mask": None}
    accumulators: dict[str, CovarianceAccumulator] = {}

    def capture(site: Site, x: torch.Tensor) -> None:
        rows, mask = _as_rows(x, site, state["mask"])
        if site.name not in accumulators:
            accumulators[site.name] = CovarianceAccumulator(rows.shape[-1], name=site.name)
        accumulators[site.name].update(rows, mask)

    handles = []
    for site in sites:
        module = modules[site.hook]
        if site.capture == "input":
            handles.append(module.register_forward_pre_hook(lambda m, args, s=site: capture(s, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, s=site: capture(s, out)))

    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n_sequences = 0
    batches = iterate_batches(model, data, batch_size, collate_fn)
    if progress:
        from tqdm.auto import tqdm

        total = len(data) if hasattr(data, "__len__") else None
        if total is not None and hasattr(data, "column_names"):
            total = -(-total // batch_size)
        batches = tqdm(batches, total=total, desc="Calibrating", unit="batch",
                       disable=accelerator is not None and not accelerator.is_local_main_process)
    try:
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            state["mask"] = batch.get("attention_mask")
            first = next(iter(batch.values()))
            n_sequences += first.shape[0] if isinstance(first, torch.Tensor) else len(first)
            model(**batch)
            if max_tokens is not None and accumulators and min(a.count for a in accumulators.values()) >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    never_reached = [s.name for s in sites if s.name not in accumulators]
    if never_reached:
        raise ValueError(
            f"No calibration data reached these sites: {never_reached}. The data was empty, or the model's forward "
            "never runs these modules for these inputs."
        )
    statistics = CalibrationStatistics(accumulators, n_sequences)
    if accelerator is not None and accelerator.num_processes > 1:
        _all_reduce(statistics, accelerator)
    return statistics


def _all_reduce(statistics: CalibrationStatistics, accelerator) -> None:
    """Sum every process's statistics in ONE collective (a flat float64 vector), in place.

    Sync point: every process must call this, with the same sites in the same order (they all ran the same model).
    """
    names = sorted(statistics.accumulators)
    parts = [t.reshape(-1) for name in names for t in statistics.accumulators[name].state_tensors()]
    flat = torch.cat(parts + [torch.tensor([float(statistics.n_sequences)], dtype=torch.float64)])
    flat = accelerator.reduce(flat.to(accelerator.device), reduction="sum").cpu()
    offset = 0
    for name in names:
        acc = statistics.accumulators[name]
        tensors = []
        for t in acc.state_tensors():
            tensors.append(flat[offset : offset + t.numel()].reshape(t.shape))
            offset += t.numel()
        acc.load_state_tensors(tensors)
    statistics.n_sequences = int(flat[offset].item())


def measure_sites(
    statistics: CalibrationStatistics,
    sites: list[Site],
    *,
    centre: bool = True,
    estimator: str = "mp_fit",
    quantile: float = 0.5,
    edge: str = "tracy_widom",
    effective_samples: str = "tokens",
) -> list[SiteMeasurement]:
    """Eigen-decompose each site's covariance (float64) and count its outliers above the MP edge.

    Args:
        statistics: from `collect_statistics`.
        sites: the sites to measure, in order.
        centre: subtract the mean before the eigen-decomposition.
        estimator, quantile, edge: passed to `count_outliers`.
        effective_samples: ``"tokens"`` uses the token (pixel) count as n; ``"sequences"`` the number of sequences,
            a conservative n for correlated tokens.
    """
    spectra = []
    for site in sites:
        acc = statistics.accumulators[site.name]
        eigenvalues = acc.eigenvalues(centre=centre)
        spectra.append(SiteMeasurement(site, acc, eigenvalues, None, statistics.n_sequences, centre))
    return recount(spectra, estimator=estimator, quantile=quantile, edge=edge, effective_samples=effective_samples)


def recount(
    measurements: list[SiteMeasurement],
    *,
    estimator: str = "mp_fit",
    quantile: float = 0.5,
    edge: str = "tracy_widom",
    effective_samples: str = "tokens",
) -> list[SiteMeasurement]:
    """The same spectra with their outliers counted again under other settings (no new eigen-decomposition).

    Used to search the quantile τ that meets a parameter target: each trial costs one `count_outliers` per site.
    """
    if effective_samples not in EFFECTIVE_SAMPLES:
        raise ValueError(f"effective_samples must be one of {EFFECTIVE_SAMPLES}, got {effective_samples!r}")
    recounted = []
    for m in measurements:
        n = m.statistics.count if effective_samples == "tokens" else m.n_sequences
        outliers = count_outliers(m.eigenvalues, max(n, 1), estimator=estimator, quantile=quantile, edge=edge)
        recounted.append(m.with_outliers(outliers))
    return recounted


def calibrate(model: nn.Module, data, *, targets=None, **options) -> list[SiteMeasurement]:
    """`find_sites` + `collect_statistics` + `measure_sites` in one call (options are split between them)."""
    sites = find_sites(model, targets)
    collect_keys = {"max_tokens", "batch_size", "collate_fn", "accelerator", "progress"}
    statistics = collect_statistics(model, data, sites, **{k: v for k, v in options.items() if k in collect_keys})
    return measure_sites(statistics, sites, **{k: v for k, v in options.items() if k not in collect_keys})
