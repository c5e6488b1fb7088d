"""Choose the vision benchmark's RMT-KD schedule on the validation split: one ``resnet_mnist`` RMT-KD row per setting.

Each run compresses the cached full-mode ResNet teacher with the ``rmtkd`` row's settings, except the schedule given
here (sites per round, steps per round, final steps, the per-round validation guard), and records what the final
model scores on the 500 validation images, how closely it follows the teacher there (arg-max agreement, mean
KL(teacher ‖ model)), its parameter count and why the run stopped. The test split is never touched.

Run: ``python benchmarks/vision_sweep.py --sites-per-round 4 --steps 100 --final-steps 300 [--max-metric-drop 0.03]
[--seed 0] [--threads 1]``; each run appends one line to ``benchmarks/results/vision_sweep.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import vision
from distillation_sweep import teacher_agreement
from harness import evaluate_accuracy, run_rmtkd

RESULTS = Path(__file__).resolve().parent / "results" / "vision_sweep.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites-per-round", type=int, default=vision.FULL.sites_per_round)
    parser.add_argument("--steps", type=int, default=vision.FULL.steps_per_round)
    parser.add_argument("--final-steps", type=int, default=vision.FULL.final_steps)
    parser.add_argument("--max-metric-drop", type=float, default=vision.MAX_METRIC_DROP)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    budget = replace(vision.FULL, sites_per_round=options.sites_per_round, steps_per_round=options.steps,
                     final_steps=options.final_steps)
    data = vision.load_data(budget)
    teacher, _ = vision.load_teacher(data)
    teacher.eval()
    calibration = data["train"].shuffle(seed=0).select(range(budget.calibration_examples))
    args = vision._rmtkd_args(budget, options.seed)
    args.max_metric_drop = options.max_metric_drop
    start = time.perf_counter()
    model, info = run_rmtkd(teacher, args, train=data["train"], validation=data["validation"],
                            calibration=calibration)
    record = {"sites_per_round": options.sites_per_round, "steps": options.steps,
              "final_steps": options.final_steps, "max_metric_drop": options.max_metric_drop, "seed": options.seed,
              "threads": options.threads, "params": model.num_parameters(),
              "target_params": round(vision.TARGET_PARAMS * teacher.num_parameters()),
              "stop_reason": info["stop_reason"], "accepted_rounds": info["accepted_rounds"],
              "rolled_back_sites": len(info["rolled_back_sites"]), "distillation_steps": info["distillation_steps"],
              "validation_accuracy": evaluate_accuracy(model, data["validation"]),
              "teacher_validation_accuracy": evaluate_accuracy(teacher, data["validation"]),
              **teacher_agreement(model, teacher, data["validation"], None),
              "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(record), flush=True)
    with RESULTS.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
