"""Cutting: carry out a `Plan` on a model with each site's measured statistics.

Width cuts (``ffn_width``, ``attention_heads``) go first, as when a model is built from its map: they resize a producer
(e.g. ``intermediate.dense``, ``query``) that a ``low_rank`` cut of the same round may then factor, and the factor must
see the producer's new output width.
"""

from __future__ import annotations

from torch import nn

from .calibration import SiteMeasurement
from .modeling.layers_rmtkd import WIDTH_KINDS
from .plan import Plan
from .reductions import REDUCTIONS

__all__ = ["apply_plan"]


def apply_plan(model: nn.Module, plan: Plan, measurements: list[SiteMeasurement], ffn_method: str = "select") -> dict:
    """Install every cut of ``plan`` into ``model`` (in place) and return the reduction-map entries it added.

    Args:
        model: the base model the plan's paths refer to.
        plan: from `plan_reductions`.
        measurements: the measurements the plan was made from (their statistics drive the surgery).
        ffn_method: ``"select"`` (keep whole neurons, least-squares refit) or ``"fold"`` (the paper's rotation).
    """
    by_site = {m.site.name: m for m in measurements}
    entries = plan.reduction_map()
    for cut in sorted(plan.cuts, key=lambda c: c.kind not in WIDTH_KINDS):
        m = by_site[cut.site]
        stats = {
            "covariance": m.statistics.covariance(centre=True),
            "mean": m.statistics.mean() if m.centred or cut.kind in WIDTH_KINDS else None,
            "eigenvalues": m.eigenvalues,
            "eigenvectors": m.eigenvectors,
        }
        options = {"method": ffn_method} if cut.kind == "ffn_width" else {}
        if cut.tokens:
            options["tokens"] = cut.tokens
        for path in cut.modules:
            REDUCTIONS[cut.kind].apply(model, path, entries[path], **stats, **options)
    return entries
