"""How fast is the text benchmark's RMT-KD model when the parameter target keeps fewer attention heads?

On MiniLM-L6 the RMT-KD model keeps 52 of 72 heads at −80% parameters: each attention output keeps the fewest heads
holding the round's signal fraction f (about 0.90), the fraction every other site keeps of its own signal. A head costs
few parameters (its rows of q, k, v and of the output projection) but a whole softmax(QKᵀ)V per pair of tokens, and
on this CPU attention runs at about a fifth of the matrix products' FLOP rate (`speed_breakdown.py`). With
``head_signal_fraction`` g below f the heads keep only g of the signal, and the parameter target's search (on
parameter counts alone) gives what they held to the other sites.

For each g this script plans the cut exactly as `RMTKDTrainer` does in the text benchmark's one round (the full-mode
teacher, its 256 calibration examples, the library's spectrum defaults, target_params 0.2, the signal-fraction
search), installs it (the cut's own weights, no distillation: speed depends on shapes only) and times it against the
teacher, alternating in one process, eager, batch 32 × seq 64, the median of ``--repeats`` comparisons with the
fractions interleaved. Accuracy is not measured here: `distillation_sweep.py --head-fraction g` measures it on the
validation split, and the ``rmtkd_fewer_heads`` row of the text benchmark on the test split.

Usage (after `python benchmarks/run.py --only minilm_rt`, or with its teacher cached):
    python benchmarks/head_fraction_speed.py [--fractions 0.8 0.6 0.4] [--runs 30] [--repeats 3] [--threads 2]
Writes ``results/head_fraction_speed.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from harness import environment
from text import FULL, TARGET_PARAMS, calibration_set, load_data, load_teacher
from transformers import AutoTokenizer

from hf_rmtkd.architectures import find_sites
from hf_rmtkd.bench import compare_speed, count_flops, example_inputs
from hf_rmtkd.calibration import collect_statistics, measure_sites
from hf_rmtkd.cut import apply_plan
from hf_rmtkd.data import minilm_path
from hf_rmtkd.plan import DEFAULT_KINDS, keep_signal_fraction, plan_reductions, signal_fraction_for_savings
from hf_rmtkd.utils import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def planned_model(teacher, measurements, head_fraction: float | None, *, target: float = TARGET_PARAMS,
                  min_rank: int = 8):
    """The teacher cut as the benchmark's RMT-KD round plans it at ``target`` (a fraction of its parameters), the
    signal fraction f used and the heads kept per attention output that drops any."""
    total = teacher.num_parameters()
    needed = total - round(target * total)
    options = dict(kinds=DEFAULT_KINDS, min_rank=min_rank, head_fraction=head_fraction)
    fraction = signal_fraction_for_savings(measurements, teacher, needed, **options)
    counted = keep_signal_fraction(measurements, fraction)
    plan = plan_reductions(counted, teacher, max_savings=needed, **options)
    model = copy.deepcopy(teacher)
    apply_plan(model, plan, counted)
    heads = {cut.site: len(cut.heads) for cut in plan.cuts if cut.kind == "attention_heads"}
    return model.eval(), fraction, heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.8, 0.6, 0.4],
                        help="head_signal_fraction values timed beside the default (the round's own fraction)")
    parser.add_argument("--runs", type=int, default=30, help="timed alternating rounds per comparison")
    parser.add_argument("--repeats", type=int, default=3, help="comparisons per fraction (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the text benchmark's 2)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_data(tokenizer, FULL)
    teacher, _ = load_teacher(data, tokenizer, FULL)
    teacher.eval()
    calibration = calibration_set(data, FULL).remove_columns("labels")
    sites = find_sites(teacher)
    measurements = measure_sites(collect_statistics(teacher, calibration, sites, batch_size=64, progress=False), sites)
    batch = example_inputs(teacher, 32, 64)
    teacher_flops, total = count_flops(teacher, batch), teacher.num_parameters()
    fractions = [None, *options.fractions]
    models = {g: planned_model(teacher, measurements, g) for g in fractions}
    speedups = {g: [] for g in fractions}
    for _ in range(options.repeats):  # fractions interleaved, so a slow spell of the host hits each of them
        for g, (model, _, _) in models.items():
            speedups[g].append(compare_speed(teacher, model, batch, runs=options.runs)["speedup"])
    rows = []
    for g, (model, fraction, heads) in models.items():
        flop_ratio, speedup = teacher_flops / count_flops(model, batch), statistics.median(speedups[g])
        rows.append({"head_signal_fraction": g, "signal_fraction": fraction, "heads_kept": heads,
                     "heads_kept_total": sum(heads.values()), "params": model.num_parameters(),
                     "param_ratio": model.num_parameters() / total, "flop_ratio": flop_ratio, "speedup": speedup,
                     "speedups": speedups[g], "share_of_flop_ceiling": speedup / flop_ratio})
        print(f"head fraction {g if g is not None else 'f'}: f {fraction:.4f}, {sum(heads.values())} heads kept "
              f"{list(heads.values())}, params x{rows[-1]['param_ratio']:.3f}, FLOP ratio x{flop_ratio:.2f}, "
              f"speed-up x{speedup:.2f} {[round(s, 2) for s in speedups[g]]}, share {speedup / flop_ratio:.0%}")
    report = {
        "environment": environment([], script="head_fraction_speed.py"),
        "input": "random token ids, batch 32 x seq 64, no padding; teacher and each cut alternating, eager",
        "target_params": TARGET_PARAMS,
        "teacher_heads": teacher.config.num_attention_heads * teacher.config.num_hidden_layers,
        "runs_per_comparison": options.runs,
        "fractions": rows,
    }
    write_text_atomic(RESULTS / "head_fraction_speed.json", json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
