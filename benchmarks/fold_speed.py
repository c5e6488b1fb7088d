"""Batch-32 speed of the vision benchmark's teacher and RMT-KD model, trained form against deployed form.

The deployed form folds every BatchNorm into the convolution before it (`hf_rmtkd.fold_batchnorm`). Speed depends on
shapes only, so the RMT-KD model is rebuilt from the shapes the ``rmtkd`` row's round log records
(`shapes.rmtkd_shaped_model`, fresh weights), next to the cached teacher. Each pair is timed alternately in this
process (`hf_rmtkd.bench.compare_speed`, medians), on the benchmark's timing input (random 1x28x28 images).

Usage (after the vision benchmark wrote ``results/resnet_mnist.json``):
    python benchmarks/fold_speed.py [--runs 100] [--threads 1]
Writes ``results/fold_speed.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import vision
from shapes import rmtkd_shaped_model
from transformers import ResNetForImageClassification

import hf_rmtkd
from hf_rmtkd.bench import compare_speed, flop_ratio
from hf_rmtkd.utils import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    teacher = ResNetForImageClassification.from_pretrained(vision.teacher_cache()).eval()
    row = json.loads((RESULTS / "resnet_mnist.json").read_text())["rows"]["rmtkd"]
    rmtkd = rmtkd_shaped_model(teacher, row["log"]).eval()
    folded = {name: hf_rmtkd.fold_batchnorm(copy.deepcopy(model)).eval()
              for name, model in (("teacher", teacher), ("rmtkd", rmtkd))}
    batch = vision.image_inputs(32)
    pairs = {"trained form, teacher vs rmtkd": (teacher, rmtkd),
             "deployed form, teacher vs rmtkd": (folded["teacher"], folded["rmtkd"]),
             "teacher, trained vs deployed": (teacher, folded["teacher"]),
             "rmtkd, trained vs deployed": (rmtkd, folded["rmtkd"]),
             "trained teacher vs deployed rmtkd": (teacher, folded["rmtkd"])}
    result = {"batch_size": 32, "threads": options.threads, "runs": options.runs, "pairs": {}}
    for name, (first, second) in pairs.items():
        speed = compare_speed(first, second, batch, runs=options.runs, warmup=5)
        result["pairs"][name] = {"speedup": speed["speedup"], "first_ms": speed["original_s"] * 1e3,
                                 "second_ms": speed["compressed_s"] * 1e3,
                                 "flop_ratio": flop_ratio(first, second, batch)}
        print(f"{name}: x{speed['speedup']:.3f} ({speed['original_s'] * 1e3:.2f} -> "
              f"{speed['compressed_s'] * 1e3:.2f} ms), FLOP ratio x{result['pairs'][name]['flop_ratio']:.2f}",
              flush=True)
    result["cpu"] = speed["cpu"]
    write_text_atomic(RESULTS / "fold_speed.json", json.dumps(result, indent=2))
    print(f"Wrote {RESULTS / 'fold_speed.json'}")


if __name__ == "__main__":
    main()
