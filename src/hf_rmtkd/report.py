"""The result of `hf_rmtkd.analyze`: one covariance spectrum per site, with the outlier count RMT-KD derived from it.

A `SpectralReport` is plain data. It round-trips through JSON (``rmtkd_report.json`` beside a checkpoint), prints as
a fixed-width table, condenses into the ``spectral_summary`` of a config (no eigenvalue lists) and draws itself with
`hf_rmtkd.plots`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .spectrum import EFFECTIVE_SAMPLES, CovarianceAccumulator, OutlierCount, count_outliers
from .utils import write_text_atomic

__all__ = ["SiteSpectrum", "SpectralReport"]

REPORT_FORMAT = "hf_rmtkd.spectral_report"
REPORT_VERSION = 1


@dataclass
class SiteSpectrum:
    """The covariance spectrum of one site (a tensor the model computes) and the MP decision taken on it.

    Args:
        name: the site's module path, e.g. ``"bert.encoder.layer.0.intermediate.dense"``.
        role: what the site is in its block: ``"embedding"``, ``"attention_in"``, ``"attention_out"``, ``"ffn_in"``,
            ``"ffn_inner"``, ``"conv_inner"`` or ``"linear"``.
        layer: the block index, −1 for embeddings.
        d: the feature dimension.
        n: the samples behind the covariance (real tokens or pixels; padding excluded).
        n_sequences: the calibration sequences (or images) those samples came from.
        eigenvalues: the covariance eigenvalues, descending (a tensor or sequence is converted to a list of floats).
        outliers: the `OutlierCount` from `hf_rmtkd.spectrum.count_outliers` (σ², λ±, threshold, k, ...).
        centred: whether the mean was subtracted before the eigen-decomposition.
    """

    name: str
    role: str
    layer: int
    d: int
    n: int
    n_sequences: int
    eigenvalues: list[float]
    outliers: OutlierCount
    centred: bool = True

    def __post_init__(self):
        values = torch.as_tensor(self.eigenvalues, dtype=torch.float64).flatten()
        if values.numel() != self.d:
            raise ValueError(f"Site '{self.name}': {values.numel()} eigenvalues given for dimension d={self.d}.")
        self.eigenvalues = values.sort(descending=True).values.tolist()

    @property
    def k(self) -> int:
        """The number of eigenvalues above the edge (the directions RMT-KD keeps, before any ``min_rank`` clamp)."""
        return self.outliers.k

    @classmethod
    def from_accumulator(
        cls,
        name: str,
        accumulator: CovarianceAccumulator,
        *,
        role: str = "linear",
        layer: int = -1,
        n_sequences: int = 0,
        centre: bool = True,
        effective_samples: str = "tokens",
        **count_kwargs: Any,
    ) -> SiteSpectrum:
        """Eigen-decompose an accumulator's covariance and count its outliers.

        Args:
            name, role, layer, n_sequences: as in the class.
            accumulator: the site's streamed statistics.
            centre: subtract the mean before the eigen-decomposition.
            effective_samples: ``"tokens"`` counts every sample in ``q = d/n``; ``"sequences"`` counts
                ``n_sequences`` instead (tokens of one sequence are correlated, so this is the cautious choice).
            **count_kwargs: passed to `count_outliers` (``estimator``, ``quantile``, ``edge``, ...).

        Returns:
            The `SiteSpectrum`.

        Example:
            >>> acc = CovarianceAccumulator(8)
            >>> acc.update(torch.randn(1000, 8))
            >>> SiteSpectrum.from_accumulator("toy", acc, n_sequences=10).d
            8
        """
        if effective_samples not in EFFECTIVE_SAMPLES:
            raise ValueError(f"effective_samples must be one of {EFFECTIVE_SAMPLES}, got '{effective_samples}'.")
        n_eff = accumulator.count if effective_samples == "tokens" else n_sequences
        if n_eff <= 0:
            raise ValueError(f"Site '{name}': no samples to count with effective_samples='{effective_samples}'.")
        # Eigenvalues only: several times faster than a full eigh at d in the thousands.
        eigenvalues = torch.linalg.eigvalsh(accumulator.covariance(centre)).flip(0)
        return cls(
            name=name, role=role, layer=layer, d=accumulator.dim, n=accumulator.count, n_sequences=n_sequences,
            eigenvalues=eigenvalues, outliers=count_outliers(eigenvalues, n_eff, **count_kwargs), centred=centre,
        )

    def summary(self) -> dict[str, Any]:
        """The site's numbers without the eigenvalue list (JSON-able)."""
        o = self.outliers
        return {
            "role": self.role, "layer": self.layer, "d": self.d, "n": self.n, "n_sequences": self.n_sequences,
            "k": self.k, "keep_ratio": self.k / self.d if self.d else 0.0, "sigma2": o.sigma2,
            "lambda_minus": o.lambda_minus, "lambda_plus": o.lambda_plus, "threshold": o.threshold,
            "n_effective": o.n_samples, "retained_variance": o.retained_variance, "centred": self.centred,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, eigenvalues included (the JSON form)."""
        return {
            "name": self.name, "role": self.role, "layer": self.layer, "d": self.d, "n": self.n,
            "n_sequences": self.n_sequences, "centred": self.centred, "outliers": self.outliers.to_dict(),
            "eigenvalues": self.eigenvalues,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteSpectrum:
        """Inverse of `to_dict`."""
        data = dict(data)
        data["outliers"] = OutlierCount(**data["outliers"])
        return cls(**data)


@dataclass
class SpectralReport:
    """The spectra of all analysed sites of a model, in forward order, with the settings that produced them.

    Args:
        sites: one `SiteSpectrum` per site.
        settings: how the analysis ran (estimator, quantile, edge, centre, effective_samples, ...), JSON-able.
        model_name: the analysed model's name or path, if known.

    Example:
        >>> report = hf_rmtkd.analyze(model, calibration_data)  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
        >>> report["bert.encoder.layer.0.intermediate.dense"].k  # doctest: +SKIP
        >>> report.to_json("out/rmtkd_report.json"); report.plot("out/spectra")  # doctest: +SKIP
    """

    sites: list[SiteSpectrum]
    settings: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self) -> Iterator[SiteSpectrum]:
        return iter(self.sites)

    def __getitem__(self, key: str | int) -> SiteSpectrum:
        """A site by name (or by position)."""
        if isinstance(key, int):
            return self.sites[key]
        for site in self.sites:
            if site.name == key:
                return site
        raise KeyError(f"No site '{key}' in this report; its sites are: {[s.name for s in self.sites]}")

    @property
    def names(self) -> list[str]:
        """The site names, in report order."""
        return [site.name for site in self.sites]

    # ---------------------------------------------------------------------------------------------------------------
    # Serialisation
    # ---------------------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: format tag, model name, settings and every site with its eigenvalues."""
        return {
            "format": REPORT_FORMAT, "version": REPORT_VERSION, "model_name": self.model_name,
            "settings": self.settings, "sites": [site.to_dict() for site in self.sites],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpectralReport:
        """Inverse of `to_dict`."""
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(f"Not an hf_rmtkd spectral report (format tag {data.get('format')!r}).")
        if data.get("version", 0) > REPORT_VERSION:
            raise ValueError(
                f"Spectral report version {data['version']} is newer than this hf_rmtkd reads ({REPORT_VERSION}); "
                "upgrade hf_rmtkd."
            )
        return cls(
            sites=[SiteSpectrum.from_dict(site) for site in data["sites"]],
            settings=dict(data.get("settings") or {}),
            model_name=data.get("model_name"),
        )

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON, atomically (a temporary file in the same folder, then renamed over ``path``).

        Args:
            path: the file to write; its folder is created if needed.

        Returns:
            The path written.
        """
        text = json.dumps(self.to_dict(), indent=1, default=_jsonable) + "\n"
        return write_text_atomic(path, text)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SpectralReport:
        """Read a report written by `to_json`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    # ---------------------------------------------------------------------------------------------------------------
    # Views
    # ---------------------------------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary for a config's ``spectral_summary``: settings and per-site numbers, no eigenvalues.

        Returns:
            ``{"model_name": ..., "settings": {...}, "sites": {site name: {role, layer, d, n, n_sequences, k,
            keep_ratio, sigma2, lambda_minus, lambda_plus, threshold, n_effective, retained_variance, centred}}}``
        """
        return {
            "model_name": self.model_name,
            "settings": json.loads(json.dumps(self.settings, default=_jsonable)),
            "sites": {site.name: site.summary() for site in self.sites},
        }

    def table(self) -> str:
        """A fixed-width table, one row per site: site, role, d, n, σ², λ₊, k, k/d and the retained variance."""
        header = ("site", "role", "d", "n", "sigma2", "lambda+", "k", "k/d", "retained")
        rows = [
            (
                site.name, site.role, str(site.d), str(site.n), f"{site.outliers.sigma2:.4g}",
                f"{site.outliers.lambda_plus:.4g}", str(site.k), f"{site.k / site.d:.3f}" if site.d else "-",
                f"{site.outliers.retained_variance:.3f}",
            )
            for site in self.sites
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            # Text columns left-aligned, numbers right-aligned.
            aligned = (c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
            return "  ".join(aligned)

        return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])

    def plot(self, directory: str | os.PathLike) -> list[Path]:
        """Draw one PNG per site and ``summary.png`` into ``directory`` (see `hf_rmtkd.plots.plot_report`).

        Returns:
            The paths written.
        """
        from .plots import plot_report  # matplotlib is only imported when plots are asked for

        return plot_report(self, directory)


def _jsonable(value: Any) -> Any:
    """JSON fallback for values callers commonly put in settings (paths, tensors, numpy scalars, sets)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"Setting value {value!r} of type {type(value).__name__} is not JSON-serialisable.")
