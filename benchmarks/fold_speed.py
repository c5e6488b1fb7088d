"""Batch-32 speed of the vision benchmark's teacher and RMT-KD model, trained form against deployed form.

The deployed form folds every BatchNorm into the convolution before it (`hf_rmtkd.fold_batchnorm`). It is also timed
in PyTorch's channels-last memory format (weights and images), the layout its CPU convolution and pooling kernels are
fastest in: in the default layout the stem's max pooling alone takes 27 to 34% of any of these models' time, a cost
the default cut cannot touch (only the opt-in residual kind narrows the stem's channels), which holds the speed-up
far below the FLOP ratio.

Speed depends on shapes only, so the RMT-KD model is rebuilt from the shapes the ``rmtkd`` row's round log records
(`shapes.rmtkd_shaped_model`, fresh weights), next to the cached teacher; so is the opt-in ``rmtkd_residual`` row's,
whose residual streams keep fewer channels (the stem's, which the max pooling reads, among them), where it was run.
Each pair is timed alternately in this process (`hf_rmtkd.bench.compare_speed`, medians), on the benchmark's timing
input (random 1x28x28 images).

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
from measure import operator_times_ms
from shapes import rmtkd_shaped_model
from torch import nn
from transformers import ResNetForImageClassification

import hf_rmtkd
from hf_rmtkd.bench import compare_speed, flop_ratio
from hf_rmtkd.utils import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def profile_forward(model: nn.Module, batch: dict, runs: int = 100) -> dict:
    """Self CPU milliseconds per forward pass of the convolutions (their kernels, oneDNN's or PyTorch's own, and
    dispatch) and of the max pooling, the convolution calls, and the whole pass (the rest: activations, adds, the
    classifier)."""
    operators = operator_times_ms(model, batch, runs, warmup=5)
    return {"total_ms": sum(ms for ms, _ in operators.values()),
            "convolution_ms": sum(ms for name, (ms, _) in operators.items() if "conv" in name),
            "convolution_calls": operators.get("aten::conv2d", (0.0, 0))[1],
            "max_pool_ms": sum(ms for name, (ms, _) in operators.items() if "max_pool" in name)}


class ChannelsLast(nn.Module):
    """A copy of ``model`` in channels-last memory format that converts its images on the way in (timed with it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values.contiguous(memory_format=torch.channels_last))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    teacher = ResNetForImageClassification.from_pretrained(vision.teacher_cache()).eval()
    rows = json.loads((RESULTS / "resnet_mnist.json").read_text())["rows"]
    trained = {"teacher": teacher, "rmtkd": rmtkd_shaped_model(teacher, rows["rmtkd"]["log"]).eval()}
    if "rmtkd_residual" in rows:  # the opt-in row: its streams keep fewer channels
        trained["rmtkd_residual"] = rmtkd_shaped_model(teacher, rows["rmtkd_residual"]["log"]).eval()
    folded = {name: hf_rmtkd.fold_batchnorm(copy.deepcopy(model)).eval() for name, model in trained.items()}
    channels_last = {name: ChannelsLast(model) for name, model in folded.items()}
    batch = vision.image_inputs(32)
    rmtkd = trained["rmtkd"]
    pairs = {"trained form, teacher vs rmtkd": (teacher, rmtkd),
             "deployed form, teacher vs rmtkd": (folded["teacher"], folded["rmtkd"]),
             "deployed form in channels-last, teacher vs rmtkd": (channels_last["teacher"], channels_last["rmtkd"]),
             "teacher, deployed vs deployed in channels-last": (folded["teacher"], channels_last["teacher"]),
             "teacher, trained vs deployed": (teacher, folded["teacher"]),
             "rmtkd, trained vs deployed": (rmtkd, folded["rmtkd"]),
             "trained teacher vs deployed rmtkd": (teacher, folded["rmtkd"])}
    if "rmtkd_residual" in trained:
        pairs.update({
            "trained form, teacher vs rmtkd_residual": (teacher, trained["rmtkd_residual"]),
            "deployed form in channels-last, teacher vs rmtkd_residual": (channels_last["teacher"],
                                                                          channels_last["rmtkd_residual"])})
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
    result["profile"] = {f"{model}, {form}": profile_forward(forms[model], batch)
                         for form, forms in (("deployed", folded), ("deployed in channels-last", channels_last))
                         for model in forms}
    print(json.dumps(result["profile"], indent=1))
    write_text_atomic(RESULTS / "fold_speed.json", json.dumps(result, indent=2))
    print(f"Wrote {RESULTS / 'fold_speed.json'}")


if __name__ == "__main__":
    main()
