"""Spectrum plots: each site's eigenvalues against the fitted Marchenko–Pastur law, and k/d across layers.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`) and rendered by the Agg canvas directly:
no display is needed, pyplot's global figure registry is never touched (so nothing leaks), and the user's own
backend (say, a notebook's inline one) is left as it was.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator, NullLocator

from .spectrum import mp_density

if TYPE_CHECKING:
    from .report import SiteSpectrum, SpectralReport

__all__ = ["plot_report", "plot_site", "plot_summary", "site_file_name"]

DPI = 80
SUMMARY_NAME = "summary"


def site_file_name(name: str) -> str:
    """A file-name stem for a site: dots kept, anything outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "site"


def plot_site(site: SiteSpectrum, path: str | os.PathLike) -> Path:
    """Plot one site's spectrum: the bulk against the fitted MP density (left) and every eigenvalue by rank (right).

    The left panel is the eigenvalue histogram as a density over all d eigenvalues (the normalisation of the MP law's
    continuous part), clipped to the bulk so outliers far to the right do not squash it; the MP density with the
    site's σ² and q; dashed λ₊ and solid threshold lines. The right panel (log scale) shows all d eigenvalues by rank,
    the k kept ones highlighted, so outliers of any size stay visible.

    Args:
        site: the `SiteSpectrum` to draw.
        path: the PNG to write.

    Returns:
        The path written.
    """
    o = site.outliers
    lam = torch.tensor(site.eigenvalues, dtype=torch.float64)
    fig = Figure(figsize=(10, 3.8), dpi=DPI)
    FigureCanvasAgg(fig)
    bulk_ax, rank_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})

    # Left: the bulk region, up to a little past the threshold.
    x_max = 1.3 * max(o.threshold, o.lambda_plus)
    if not x_max > 0:
        x_max = float(lam.max()) if float(lam.max()) > 0 else 1.0
    in_range = lam[(lam >= 0) & (lam <= x_max)]
    bins = int(min(120, max(20, 2 * math.sqrt(site.d))))
    width = x_max / bins
    counts = torch.histc(in_range, bins=bins, min=0.0, max=x_max) if in_range.numel() else torch.zeros(bins)
    edges = torch.linspace(0, x_max, bins + 1, dtype=torch.float64)
    bulk_ax.stairs((counts / (site.d * width)).numpy(), edges.numpy(), fill=True, color="0.7", label="eigenvalues")
    grid = torch.linspace(0, x_max, 600, dtype=torch.float64)
    bulk_ax.plot(grid.numpy(), mp_density(grid, o.sigma2, o.q).numpy(), color="tab:blue", lw=1.5,
                 label=f"MP (σ²={o.sigma2:.3g}, q={o.q:.3g})")
    bulk_ax.axvline(o.lambda_plus, color="tab:orange", ls="--", lw=1.2, label=f"λ₊ = {o.lambda_plus:.3g}")
    if not math.isclose(o.threshold, o.lambda_plus, rel_tol=1e-9):
        bulk_ax.axvline(o.threshold, color="tab:red", lw=1.2, label=f"threshold ({o.edge}) = {o.threshold:.3g}")
    beyond = int((lam > x_max).sum())
    if beyond:
        bulk_ax.text(0.98, 0.55, f"{beyond} eigenvalue(s) beyond the axis\nlargest λ = {float(lam[0]):.3g}",
                     transform=bulk_ax.transAxes, ha="right", va="top", fontsize=8)
    bulk_ax.set_xlim(0, x_max)
    for axis in (bulk_ax.xaxis, bulk_ax.yaxis):
        axis.set_major_locator(MaxNLocator(5))  # few ticks: creating tick artists is most of the drawing time
    bulk_ax.set_xlabel("eigenvalue λ")
    bulk_ax.set_ylabel("density")
    bulk_ax.legend(fontsize=7, loc="upper right")

    # Right: the whole spectrum by rank, log scale. Numerically zero eigenvalues (n < d, round-off) are left out: a
    # log axis cannot show zero, and values of 1e-16 would squash the rest.
    ranks = torch.arange(1, site.d + 1)
    positive = lam > float(lam.max()) * 1e-10 * site.d
    kept = positive & (ranks <= site.k)
    rank_ax.plot(ranks[positive & ~kept].numpy(), lam[positive & ~kept].numpy(), ".", ms=3, color="0.55",
                 label="bulk")
    rank_ax.plot(ranks[kept].numpy(), lam[kept].numpy(), ".", ms=4, color="tab:red", label=f"kept (k={site.k})")
    rank_ax.axhline(o.lambda_plus, color="tab:orange", ls="--", lw=1.2)
    rank_ax.axhline(o.threshold, color="tab:red", lw=1.0)
    if bool(positive.any()):
        rank_ax.set_yscale("log")
    rank_ax.set_xscale("log")
    # Log axes place dozens of minor ticks, and mathtext tick labels; both cost most of the drawing time.
    for axis in (rank_ax.xaxis, rank_ax.yaxis):
        axis.set_minor_locator(NullLocator())
        axis.set_major_formatter(FormatStrFormatter("%g"))
    rank_ax.set_xlabel("rank")
    rank_ax.set_ylabel("eigenvalue λ")
    rank_ax.legend(fontsize=7, loc="lower left")  # the spectrum falls from top left to bottom right

    ratio = site.k / site.d if site.d else 0.0
    fig.suptitle(
        f"{site.name}  [{site.role}, layer {site.layer}]\n"
        f"k/d = {site.k}/{site.d} ({ratio:.0%}), σ² = {o.sigma2:.3g}, n = {o.n_samples}, "
        f"retained variance {o.retained_variance:.1%}",
        fontsize=9,
    )
    # Fixed margins: tight_layout would measure every tick label, which doubles the drawing time.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.84, wspace=0.25)
    return _save(fig, path)


def plot_summary(report: SpectralReport, path: str | os.PathLike) -> Path:
    """Plot k/d (left) and the retained variance (right) per layer, one line per role.

    Embeddings sit at layer −1. When a role has several sites in one layer, each is a dot and the line joins the
    layer means.

    Args:
        report: the `SpectralReport`.
        path: the PNG to write.

    Returns:
        The path written.
    """
    by_role: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for site in report.sites:
        ratio = site.k / site.d if site.d else 0.0
        by_role[site.role][site.layer].append((ratio, site.outliers.retained_variance))

    fig = Figure(figsize=(10, 3.8), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for column, (ax, label) in enumerate(zip(axes, ("k / d", "retained variance"), strict=True)):
        for index, (role, layers) in enumerate(by_role.items()):
            colour = f"C{index % 10}"
            xs = sorted(layers)
            means = [sum(v[column] for v in layers[x]) / len(layers[x]) for x in xs]
            ax.plot(xs, means, marker="o", ms=4, color=colour, label=role)
            dots = [(x, v[column]) for x in xs for v in layers[x] if len(layers[x]) > 1]
            if dots:
                ax.scatter(*zip(*dots, strict=True), s=10, color=colour, alpha=0.5)
        ax.set_xlabel("layer (−1 = embeddings)")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    title = "RMT-KD spectral summary" + (f": {report.model_name}" if report.model_name else "")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_report(report: SpectralReport, directory: str | os.PathLike) -> list[Path]:
    """Write one PNG per site (named after the site, see `site_file_name`) and ``summary.png`` into ``directory``.

    Args:
        report: the `SpectralReport`.
        directory: the output folder (created if needed).

    Returns:
        The paths written: the sites' in report order, then the summary.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    used = {SUMMARY_NAME}
    paths = []
    for site in report.sites:
        stem = site_file_name(site.name)
        # Distinct sites may map to one stem (e.g. names differing only in unsafe characters): number the repeats.
        candidate, repeat = stem, 1
        while candidate in used:
            repeat += 1
            candidate = f"{stem}_{repeat}"
        used.add(candidate)
        paths.append(plot_site(site, directory / f"{candidate}.png"))
    paths.append(plot_summary(report, directory / f"{SUMMARY_NAME}.png"))
    return paths


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    fig.clear()  # drop the artists now rather than at garbage collection
    return path
