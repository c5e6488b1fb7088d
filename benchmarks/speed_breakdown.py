"""Where the batch-32 time of the MiniLM-L6 RMT-KD model goes, and what ``torch.compile`` makes of the speed-up.

The measured speed-up of the text benchmark stays below its FLOP ratio (the ceiling) because part of every forward
pass is not matrix products: LayerNorm, softmax, GELU, residual adds, reshapes and the attention itself run at the
unchanged hidden width (384) and cost about the same in both models. This script

1. profiles both models in eager mode and sums self CPU time by kind of operator (per forward pass), and
2. times both models eager and compiled with ``torch.compile``, alternating in one process as every timing here.
   The eager comparison is repeated (``--repeats`` blocks of ``--runs`` rounds): on a shared machine one block's
   median speed-up moves by ±10% between blocks, so the median over blocks and their range are reported.

Speed depends on shapes only, so the RMT-KD model is rebuilt from the ranks in ``results/minilm_rt.json`` (the rmtkd
row's round log) with freshly initialised weights (`shapes.rmtkd_shaped_model`); the teacher is the full-mode one
`text.py` caches.

Usage (after `python benchmarks/run.py --only minilm_rt`):
    python benchmarks/speed_breakdown.py [--runs 50] [--repeats 5] [--threads 2] [--row rmtkd]
Writes ``results/speed_breakdown.json`` (``results/speed_breakdown_<row>[_threads<N>].json`` for another row or
thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from harness import environment
from measure import operator_times_ms
from shapes import rmtkd_shaped_model
from text import FULL, teacher_cache
from transformers import AutoModelForSequenceClassification

from hf_rmtkd.bench import compare_speed, count_flops, example_inputs
from hf_rmtkd.utils import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_THREADS = 2  # the text benchmark's timings

# Operator kinds: exact aten names, or name fragments where the kernel names vary. Self time of `aten::linear` lands
# in addmm / mm; what matches nothing (copies, reshapes, dispatch) is "other".
EXACT = {
    "matrix products (Linear)": {"aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear"},
    "elementwise (add, mul, ...)": {"aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::div", "aten::sub",
                                    "aten::rsub", "aten::tanh"},
    "embedding lookup": {"aten::embedding", "aten::index_select"},
}
FRAGMENTS = {
    "attention (SDPA, softmax)": ("scaled_dot_product", "flash_attention", "softmax"),
    "LayerNorm": ("layer_norm",),
    "GELU": ("gelu",),
}


def operator_kind(name: str) -> str:
    """The kind of a profiled operator (see `EXACT`, `FRAGMENTS`)."""
    for kind, names in EXACT.items():
        if name in names:
            return kind
    return next((kind for kind, parts in FRAGMENTS.items() if any(part in name for part in parts)), "other")


def time_by_kind(model, batch, runs: int) -> dict[str, float]:
    """Self CPU milliseconds per forward pass, summed by operator kind."""
    totals = defaultdict(float)
    for name, (ms, _) in operator_times_ms(model, batch, runs).items():
        totals[operator_kind(name)] += ms
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def output_name(row: str, threads: int) -> str:
    """``speed_breakdown.json`` for the rmtkd row at the benchmark's 2 threads; else the row and threads named."""
    return ("speed_breakdown" + ("" if row == "rmtkd" else f"_{row}") + ("" if threads == DEFAULT_THREADS else
            f"_threads{threads}") + ".json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="timed alternating rounds per comparison")
    parser.add_argument("--repeats", type=int, default=5, help="eager comparisons (blocks of --runs rounds)")
    parser.add_argument("--row", default="rmtkd", help="the result row whose shapes are rebuilt (its round log)")
    parser.add_argument("--profile-runs", type=int, default=10, help="forward passes profiled per model")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch intra-op threads")
    parser.add_argument("--results", type=Path, default=RESULTS / "minilm_rt.json",
                        help="the text benchmark's results (or its .partial.json while it runs)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    result = json.loads(options.results.read_text())
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_cache(FULL)).eval()
    row = result["rows"][options.row]
    student = rmtkd_shaped_model(teacher, row["log"])
    batch = example_inputs(teacher, 32, 64)
    flop_ratio = count_flops(teacher, batch) / count_flops(student, batch)
    assert student.num_parameters() == row["params"], "the rebuilt shapes differ from the row's"

    profile = {"teacher": time_by_kind(teacher, batch, options.profile_runs),
               "rmtkd": time_by_kind(student, batch, options.profile_runs)}
    blocks = [compare_speed(teacher, student, batch, runs=options.runs) for _ in range(options.repeats)]
    speedups = [block["speedup"] for block in blocks]
    eager = blocks[speedups.index(statistics.median_low(speedups))]  # the block whose speed-up is the median
    compiled_teacher, compiled_student = torch.compile(teacher), torch.compile(student)
    compiled = compare_speed(compiled_teacher, compiled_student, batch, runs=options.runs, warmup=5)
    report = {
        "environment": environment([], script="speed_breakdown.py"),
        "input": "random token ids, batch 32 x seq 64, no padding; teacher and RMT-KD model alternating",
        "row": options.row,
        "params": {"teacher": teacher.num_parameters(), "rmtkd": student.num_parameters()},
        "flop_ratio": flop_ratio,
        "eager": {"speedup": eager["speedup"], "share_of_flop_ceiling": eager["speedup"] / flop_ratio,
                  "teacher_ms": eager["original_s"] * 1e3, "rmtkd_ms": eager["compressed_s"] * 1e3,
                  "speedups": speedups, "runs_per_block": options.runs},
        "compiled": {"speedup": compiled["speedup"], "share_of_flop_ceiling": compiled["speedup"] / flop_ratio,
                     "teacher_ms": compiled["original_s"] * 1e3, "rmtkd_ms": compiled["compressed_s"] * 1e3},
        "self_cpu_ms_per_forward_eager": profile,
    }
    write_text_atomic(RESULTS / output_name(options.row, options.threads), json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "environment"}, indent=2))


if __name__ == "__main__":
    main()
