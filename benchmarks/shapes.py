"""The RMT-KD model of a benchmark result, rebuilt from the shapes its round log records (weights: fresh).

Speed and memory depend on shapes only, so the scripts that study them (`speed_breakdown.py`, `memory_probe.py`)
rebuild the compressed model from the ``rmtkd`` row's ``log`` in ``results/<benchmark>.json`` instead of keeping the
trained checkpoint.
"""

from __future__ import annotations

import copy

from torch import nn

from hf_rmtkd.architectures import find_sites
from hf_rmtkd.modeling import apply_reduction_map, rmtkd_class_for
from hf_rmtkd.modeling.layers_rmtkd import WIDTH_KINDS
from hf_rmtkd.plan import Plan, PlannedCut
from hf_rmtkd.reductions.residual import stream_entries, stream_segments
from hf_rmtkd.reductions.residual_channels import CHANNEL_STREAM_MODEL_TYPES, channel_stream_entry, channel_streams

__all__ = ["rmtkd_shaped_model"]


def rmtkd_shaped_model(teacher: nn.Module, log: list[dict]) -> nn.Module:
    """The teacher with every accepted round's cuts installed at the logged ranks (weights: fresh initialisation).

    Args:
        teacher: the uncompressed model the run started from (left unchanged).
        log: the run's round log (`RMTKDTrainer.rmtkd_log`, the ``log`` of a result's ``rmtkd`` row): per round,
            ``sites`` maps a site name to its cut (``kind``, ``d``, ``k``, ``k_spectrum``, optionally ``heads`` and
            ``rows``; a ``residual`` cut is keyed by the LayerNorm starting its stream segment, or on a ResNet by
            the first convolution writing the stream). Rounds logged with
            ``accepted: False`` were rolled back by the trainer and are skipped.

    Returns:
        The RMTKD model, in eval mode, with the shapes the run ended with.
    """
    sites = {site.name: site for site in find_sites(teacher)}
    base = copy.deepcopy(teacher)
    reductions = {}
    for entry in log:
        if not entry.get("accepted", True):  # the trainer restored the sites of a rolled-back round
            continue
        cuts, stream = [], {}
        for name, cut in entry["sites"].items():
            if cut["kind"] == "residual":  # keyed by the LayerNorm that starts the stream segment
                stream[name] = cut["k"]
                continue
            site, kind = sites[name], cut["kind"]
            modules = [name] if kind == "embedding" else list(site.consumers)
            producers = list(site.producers) if kind in WIDTH_KINDS else []
            shared = kind == "low_rank" and len(modules) > 1
            stored = list(range(cut["rows"])) if "rows" in cut else []  # only their count shapes the embedding
            cuts.append(PlannedCut(name, site.role, kind, cut["d"], cut["k_spectrum"], cut["k"], 0, 0, modules,
                                   producers, shared, cut.get("heads", []), stored))
        round_map = Plan(cuts, {}).reduction_map()
        if stream and base.config.model_type in CHANNEL_STREAM_MODEL_TYPES:  # keyed by each stream's first writer
            round_map.update({s.writers[0]: channel_stream_entry(s, stream[s.writers[0]])
                              for s in channel_streams(base) if s.writers[0] in stream})
        elif stream:
            segments = stream_segments(base)
            round_map.update(stream_entries(segments, [stream[s.norm] for s in segments]))
        apply_reduction_map(base, round_map)  # the stream before the cuts planned on it, as the trainer made them
        reductions.update(round_map)
    return rmtkd_class_for(base).from_base(base, reductions).eval()
