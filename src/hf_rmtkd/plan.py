"""Planning: from measured spectra to a reduction per site, decided once.

Each site's kind follows from its role (embeddings → ``embedding``, FFN / bottleneck inner widths → ``ffn_width``,
every other Linear input → ``low_rank`` of the Linears reading it, which share one projection). The rank is the
spectrum's outlier count k, clamped to ``[min_rank, d]`` and to ``min_keep_ratio·d``; a cut that would not save
parameters is skipped, with the reason kept for the report. With ``attention_heads`` enabled, an attention output
(BERT family) whose kept signal a parameter target leaves on fewer heads drops the others instead of being factored.

Example:
    >>> plan = plan_reductions(measurements, model, min_rank=8)  # doctest: +SKIP
    >>> plan.reduction_map()  # doctest: +SKIP
    {'bert.encoder.layer.0.output.dense': {'kind': 'ffn_width', 'width': 201, 'producers': [...]}, ...}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .architectures import attention_head_dim
from .calibration import SiteMeasurement
from .modeling.layers_rmtkd import WIDTH_KINDS
from .reductions.attention_heads import head_signal, heads_holding
from .spectrum import signal_variances

__all__ = [
    "KIND_FOR_ROLE",
    "MAX_QUANTILE",
    "Plan",
    "PlannedCut",
    "keep_signal_fraction",
    "plan_reductions",
    "quantile_for_savings",
    "signal_fraction_for_savings",
]

KIND_FOR_ROLE = {
    "embedding": "embedding",
    "ffn_inner": "ffn_width",
    "conv_inner": "ffn_width",
    "attention_in": "low_rank",
    "attention_out": "low_rank",
    "ffn_in": "low_rank",
    "linear": "low_rank",
}
KINDS = ("low_rank", "ffn_width", "attention_heads", "embedding", "residual")
# attention_heads acts only under a parameter target (a signal fraction below 1): on MiniLM-L6 at -80% it kept 52 of
# 72 heads and ended 0.6 points higher on validation than the same run without it (benchmarks/distillation_sweep.py).
DEFAULT_KINDS = ("ffn_width", "low_rank", "attention_heads", "embedding")
# Within a block, sites whose cut may narrow a producer's output come first (FFN inner widths, then the attention
# output, whose heads narrow q/k/v), so the low-rank cuts of those producers are sized on the narrowed layers.
PLANNING_ORDER = {"ffn_inner": 0, "conv_inner": 0, "attention_out": 1}
MAX_QUANTILE = 0.99  # the largest τ the target search tries: σ² at the 99th percentile of the spectrum


@dataclass
class PlannedCut:
    """One planned reduction: which site, which kind, to what rank, and what it saves."""

    site: str
    role: str
    kind: str
    d: int
    k_spectrum: int  # the outlier count before clamping
    rank: int  # the rank / width that will be installed
    params_before: int
    params_after: int
    modules: list[str]  # the modules the cut replaces or resizes
    producers: list[str] = field(default_factory=list)
    shared_projection: bool = False  # low_rank of several Linears reading one input: one P, held by modules[0]
    heads: list[int] = field(default_factory=list)  # attention_heads: the heads kept (rank = len(heads) · head_dim)
    tokens: list[int] = field(default_factory=list)  # embedding: the token ids whose codes are stored ([]: all)

    @property
    def saved(self) -> int:
        return self.params_before - self.params_after


@dataclass
class Plan:
    """The cuts to make (in order) and the sites left alone, with the reason."""

    cuts: list[PlannedCut]
    skipped: dict[str, str]

    def reduction_map(self) -> dict[str, dict]:
        """The ``RMTKDConfig.reductions`` entries for these cuts: ``{module path: {kind, rank | width, ...}}``."""
        entries = {}
        for cut in self.cuts:
            if cut.kind == "ffn_width":
                entries[cut.modules[0]] = {"kind": "ffn_width", "width": cut.rank, "producers": list(cut.producers)}
            elif cut.kind == "attention_heads":
                entries[cut.modules[0]] = {"kind": "attention_heads", "width": cut.rank,
                                           "head_dim": cut.rank // len(cut.heads), "producers": list(cut.producers),
                                           "heads": list(cut.heads)}
            else:
                for path in cut.modules:
                    entries[path] = {"kind": cut.kind, "rank": cut.rank}
                    if cut.tokens:
                        entries[path]["rows"] = len(cut.tokens)
                    if cut.shared_projection and path != cut.modules[0]:
                        entries[path]["shares_projection_with"] = cut.modules[0]
        return entries

    @property
    def params_saved(self) -> int:
        return sum(c.saved for c in self.cuts)

    def to_dict(self) -> dict:
        return {"cuts": [asdict(c) for c in self.cuts], "skipped": dict(self.skipped)}


def _io(module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a Linear / Conv1D / Conv2d / norm layer."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
        width = module.num_features if isinstance(module, nn.BatchNorm2d) else module.normalized_shape[0]
        return width, width
    return tuple(module.weight.shape)  # GPT-2 Conv1D stores (in, out)


def _params(module: nn.Module, d_in: int, d_out: int) -> int:
    """Parameters of ``module`` resized to (d_in, d_out)."""
    bias = d_out if getattr(module, "bias", None) is not None else 0
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return d_out * d_in * kh * kw // module.groups + bias
    if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
        return d_out + bias if getattr(module, "weight", None) is not None else bias
    return d_in * d_out + bias


def _low_rank_params(module: nn.Module, d_in: int, d_out: int, k: int) -> int:
    """Parameters after factoring the input through k directions (the second factor carries the centring bias)."""
    taps = module.kernel_size[0] * module.kernel_size[1] if isinstance(module, nn.Conv2d) else 1
    return k * d_in + d_out * k * taps + d_out


def _embedding_tied(model: nn.Module, path: str, modules: dict) -> bool:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return output is not None and getattr(output, "weight", None) is modules[path].weight


def _stored_tokens(path: str, vocabulary: list[int] | None, vocab_size: int) -> list[int]:
    """The token ids an embedding cut of ``path`` stores codes for: ``vocabulary`` checked; [] for every token."""
    if vocabulary is None:
        return []
    tokens = sorted(set(vocabulary))
    if not tokens or tokens[0] < 0 or tokens[-1] >= vocab_size:
        raise ValueError(f"embedding '{path}': the vocabulary to keep must be token ids in [0, {vocab_size}), got "
                         f"{len(tokens)} ids from {tokens[:1]} to {tokens[-1:]}.")
    return tokens if len(tokens) < vocab_size else []


def _heads_to_keep(measurement: SiteMeasurement, modules: dict, head_dim: int | None,
                   head_fraction: float | None = None) -> list[int]:
    """For an attention output whose q/k/v are still plain Linears: the fewest heads holding the site's signal
    fraction (or ``head_fraction``, when that is lower) of what its kept outliers carry, when that is fewer than all
    of them; else ``[]`` (no head is dropped)."""
    site = measurement.site
    if (site.role != "attention_out" or not head_dim or not site.producers or measurement.d % head_dim
            or not all(type(modules[p]) is nn.Linear for p in site.producers)):
        return []
    signal = signal_variances(measurement.eigenvalues, measurement.outliers)
    mass = head_signal(measurement.eigenvectors[:, : signal.numel()], signal, head_dim)
    fraction = measurement.outliers.signal_fraction
    heads = heads_holding(mass, fraction if head_fraction is None else min(fraction, head_fraction))
    return heads if len(heads) * head_dim < measurement.d else []


def plan_reductions(
    measurements: list[SiteMeasurement],
    model: nn.Module,
    *,
    kinds: tuple[str, ...] | list[str] = DEFAULT_KINDS,
    min_rank: int = 8,
    min_keep_ratio: float = 0.0,
    max_sites: int | None = None,
    max_savings: int | None = None,
    exclude: set[str] | frozenset[str] = frozenset(),
    vocabulary: list[int] | None = None,
    head_fraction: float | None = None,
) -> Plan:
    """Turn measured spectra into reductions, shallow to deep.

    Args:
        measurements: from `calibration.measure_sites` (in depth order).
        model: the base model the site paths refer to.
        kinds: the reduction kinds allowed.
        min_rank: the smallest rank / width ever installed.
        min_keep_ratio: the smallest kept fraction k/d (guards dense deep spectra against over-cutting).
        max_sites: plan at most this many cuts (the trainer's sites per round); None plans every site.
        max_savings: stop adding cuts once they save this many parameters (what a parameter target still needs);
            None: no limit.
        exclude: site names not to cut (e.g. rolled back in an earlier round).
        vocabulary: token ids whose embedding codes an ``embedding`` cut stores (the others read their nearest kept
            token's; see `reductions.embedding`); None stores every token's.
        head_fraction: with ``attention_heads``, the signal fraction each attention output's kept heads hold when it
            is below the site's own (`RMTKDTrainingArguments.head_signal_fraction`); None: the site's own, so heads
            drop only under a parameter target.

    Returns:
        A `Plan`; sites not cut are in ``plan.skipped`` with the reason.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"Unknown reduction kinds {sorted(unknown)}; choose from {KINDS}.")
    if min_rank < 1:
        raise ValueError(f"min_rank must be at least 1, got {min_rank}")
    if head_fraction is not None and not 0 <= head_fraction <= 1:
        raise ValueError(f"head_fraction must lie in [0, 1], got {head_fraction}")
    modules = dict(model.named_modules())
    cuts, skipped = [], {}
    # Widths after the cuts planned so far: a width cut (ffn_width, attention_heads) narrows its producers' outputs and
    # its consumer's input, and is applied before any low-rank cut, so later cuts of the plan see the narrowed layers.
    shapes = {path: _io(module) for path, module in modules.items() if hasattr(module, "weight")}
    ordered = sorted(measurements, key=lambda m: (m.site.layer, PLANNING_ORDER.get(m.site.role, 2)))
    head_dim = attention_head_dim(model) if "attention_heads" in kinds else None
    for m in ordered:
        site, d = m.site, m.d
        kind = KIND_FOR_ROLE[site.role]
        rank = min(d, max(m.k, min_rank, math.ceil(min_keep_ratio * d)))
        heads = _heads_to_keep(m, modules, head_dim, head_fraction) if site.name not in exclude else []
        if heads:
            kind, rank = "attention_heads", len(heads) * head_dim
        if site.name in exclude:
            skipped[site.name] = "excluded"
            continue
        if kind not in kinds:
            skipped[site.name] = f"kind {kind} not enabled"
            continue
        if rank >= d:
            skipped[site.name] = f"k = {m.k} keeps every direction (d = {d})"
            continue
        new_shapes, shared = {}, False
        if kind == "low_rank":
            touched, producers = list(site.consumers), []
            before = sum(_params(modules[c], *shapes[c]) for c in touched)
            after = sum(_low_rank_params(modules[c], *shapes[c], rank) for c in touched)
            # Linears reading one input keep one copy of P (k × d) between them.
            shared = len(touched) > 1 and not any(isinstance(modules[c], nn.Conv2d) for c in touched)
            after -= (len(touched) - 1) * rank * d if shared else 0
        elif kind in WIDTH_KINDS:
            if not all(type(modules[p]) in (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm)
                       for p in site.producers):
                skipped[site.name] = "a producer was already replaced by a reduced module"
                continue
            touched, producers = [site.consumers[0]], list(site.producers)
            new_shapes = {p: (shapes[p][0], rank) for p in producers}
            new_shapes[touched[0]] = (rank, shapes[touched[0]][1])
            before = sum(_params(modules[p], *shapes[p]) for p in new_shapes)
            after = sum(_params(modules[p], *io) for p, io in new_shapes.items())
        else:
            if _embedding_tied(model, site.name, modules):
                skipped[site.name] = "embedding is tied to the output layer"
                continue
            vocab = modules[site.name].weight.shape[0]
            tokens = _stored_tokens(site.name, vocabulary, vocab)
            before, after = vocab * d, (len(tokens) or vocab) * rank + rank * d + d
            touched, producers = [site.name], []
        if after >= before:
            skipped[site.name] = f"rank {rank} would not save parameters ({after} >= {before})"
            continue
        cuts.append(PlannedCut(site.name, site.role, kind, d, m.k, rank, before, after, touched, producers, shared,
                               heads, tokens if kind == "embedding" else []))
        shapes.update(new_shapes)
        if max_sites is not None and len(cuts) >= max_sites:
            break
        if max_savings is not None and sum(c.saved for c in cuts) >= max_savings:
            break
    return Plan(cuts, skipped)


def _gentlest_that_saves(saves_enough: Callable[[float], bool], gentle: float, harsh: float, steps: int) -> float:
    """Bisect a cut knob between ``gentle`` and ``harsh`` for the value nearest ``gentle`` whose plan saves enough.

    ``gentle`` itself when it suffices; ``harsh`` when even it does not.
    """
    if saves_enough(gentle):
        return gentle
    if not saves_enough(harsh):
        return harsh
    for _ in range(steps):
        middle = (gentle + harsh) / 2
        gentle, harsh = (gentle, middle) if saves_enough(middle) else (middle, harsh)
    return harsh


def _whole_plan_saves(model: nn.Module, needed: int, plan_options: dict) -> Callable[[list[SiteMeasurement]], bool]:
    # max_sites / max_savings are ignored: the plan over every site must reach the target.
    options = {**plan_options, "max_sites": None, "max_savings": None}
    return lambda measurements: plan_reductions(measurements, model, **options).params_saved >= needed


def quantile_for_savings(
    count_at: Callable[[float], list[SiteMeasurement]],
    model: nn.Module,
    needed: int,
    *,
    start: float,
    steps: int = 20,
    **plan_options,
) -> float:
    """The smallest quantile τ in ``[start, MAX_QUANTILE]`` whose plan over every site saves ``needed`` parameters.

    A larger τ raises the σ² estimate and so the MP edge, and every site keeps fewer directions. Only parameter
    counts are compared, never a metric. (The trainer's default under a target is `signal_fraction_for_savings`.)

    Args:
        count_at: ``τ -> measurements`` with the outliers counted at τ (e.g. `calibration.recount`).
        model: the base model the site paths refer to.
        needed: parameters the plan must save.
        start: the configured τ; returned unchanged when it already saves enough.
        steps: bisection steps.
        plan_options: passed to `plan_reductions`.

    Returns:
        The τ found; ``MAX_QUANTILE`` when even it does not save enough.
    """
    saves = _whole_plan_saves(model, needed, plan_options)
    return _gentlest_that_saves(lambda quantile: saves(count_at(quantile)), start, MAX_QUANTILE, steps)


def _signal_rank(measurement: SiteMeasurement, fraction: float) -> int:
    """The fewest outliers holding ``fraction`` of the site's signal variance (all k at fraction 1)."""
    signal = signal_variances(measurement.eigenvalues, measurement.outliers)
    if fraction >= 1 or signal.numel() == 0 or float(signal.sum()) <= 0:
        return measurement.k
    held = torch.cumsum(signal, 0) / signal.sum()
    return min(measurement.k, int((held < fraction).sum()) + 1)


def keep_signal_fraction(measurements: list[SiteMeasurement], fraction: float) -> list[SiteMeasurement]:
    """The measurements with each site's k lowered to the fewest outliers holding ``fraction`` of its signal.

    A site's signal is the variance its outlier directions carry above the noise (`spectrum.signal_variances`); the
    bulk carries none, so no direction below the MP edge is ever kept. Keeping the same fraction everywhere lets the
    spectrum decide how a parameter target is shared between sites: a site whose signal is spread over many
    directions keeps many.

    Example:
        >>> kept = keep_signal_fraction(measurements, 0.9)  # doctest: +SKIP
        >>> [m.k for m in kept] <= [m.k for m in measurements]  # doctest: +SKIP
        True
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    if fraction >= 1:
        return list(measurements)
    kept = []
    for m in measurements:
        k = _signal_rank(m, fraction)
        if k == m.k:
            kept.append(m.with_outliers(replace(m.outliers, signal_fraction=fraction)))
            continue
        total = float(m.eigenvalues.clamp(min=0).sum())
        retained = float(m.eigenvalues[:k].clamp(min=0).sum()) / total if total > 0 else 0.0
        note = f"{k} of the {m.k} outliers: those holding {fraction:.4f} of the signal variance"
        outliers = replace(m.outliers, k=k, retained_variance=retained, note=note, signal_fraction=fraction)
        kept.append(m.with_outliers(outliers))
    return kept


def signal_fraction_for_savings(
    measurements: list[SiteMeasurement],
    model: nn.Module,
    needed: int,
    *,
    steps: int = 30,
    **plan_options,
) -> float:
    """The largest signal fraction f in ``[0, 1]`` whose plan over every site saves ``needed`` parameters.

    Every site keeps the fewest outliers holding f of its signal variance (`keep_signal_fraction`); f = 1 is the
    spectrum's own cut. Only parameter counts are compared, never a metric.

    Args:
        measurements: the sites' spectra counted at the configured τ.
        model: the base model the site paths refer to.
        needed: parameters the plan must save.
        steps: bisection steps.
        plan_options: passed to `plan_reductions`.

    Returns:
        The f found: 1.0 when the spectrum's cut already saves enough, 0.0 (one direction per site, before
        ``min_rank``) when even that does not.
    """
    saves = _whole_plan_saves(model, needed, plan_options)
    return _gentlest_that_saves(lambda f: saves(keep_signal_fraction(measurements, f)), 1.0, 0.0, steps)
