"""Benchmark ``resnet_mnist``: a small bottleneck ResNet trained from scratch on MNIST-5k, RMT-KD against baselines.

Data (`hf_rmtkd.data.load_mnist5k`): a stratified 80/20 split (seed 0) gives 4,000 training and 1,000 test images;
500 validation images are carved from the training part (stratified, seed 0) and the teacher trains on the other
3,500. Validation alone accepts or rolls back RMT-KD rounds; the test split is only measured.

RMT-KD cuts the bottleneck blocks' inner channels (`ffn_width` on ``conv_inner`` sites, the only sites the ResNet
role table has). Baselines, where they apply to a CNN: truncated SVD of every encoder convolution at one kept
fraction of its input channels, activation PCA at one energy threshold, both sized to RMT-KD's parameter count and
distilled as long as RMT-KD trained; the same rounds without distillation; a τ sweep. Layer dropping is not run: the
blocks that could be dropped (the second of each stage) carry no embedding-like bulk to trade against, and the issue
asks for the baselines "where they apply".
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from baselines import (
    distil,
    match_parameter,
    pca_energy,
    pca_energy_params,
    rmtkd_without_distillation,
    svd_rank_ratio,
    svd_rank_ratio_params,
)
from harness import environment, evaluate_accuracy, finish_row, run_rmtkd
from measure import checkpoint_bytes
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments, set_seed

import hf_rmtkd
from hf_rmtkd.architectures import find_sites
from hf_rmtkd.bench import parameter_count
from hf_rmtkd.calibration import collect_statistics, measure_sites
from hf_rmtkd.data import load_mnist5k

__all__ = ["FULL", "QUICK", "VisionBudget", "run_resnet_mnist"]

HERE = Path(__file__).resolve().parent
CACHED_TEACHER = HERE / ".cache" / "resnet_mnist_teacher"
ARCHITECTURE = dict(num_channels=1, embedding_size=32, hidden_sizes=[64, 128, 256], depths=[2, 2, 2],
                    layer_type="bottleneck", num_labels=10)
TEACHER_SETTINGS = {"architecture": ARCHITECTURE, "train_examples": 3500, "epochs": 4, "learning_rate": 1e-3,
                    "batch_size": 64, "seed": 0}
KINDS = ["ffn_width", "low_rank", "embedding"]
MIN_RANK = 8  # the library default
MATCH_TOLERANCE = 0.03


@dataclass(frozen=True)
class VisionBudget:
    """How much work a mode does."""

    sites_per_round: int
    steps_per_round: int
    max_rounds: int
    tau_steps: int
    runs_b32: int
    runs_b1: int
    seeds: tuple[int, ...]
    validation_examples: int = 500
    calibration_examples: int = 256


QUICK = VisionBudget(sites_per_round=4, steps_per_round=30, max_rounds=3, tau_steps=30, runs_b32=20, runs_b1=30,
                     seeds=(0,))
FULL = VisionBudget(sites_per_round=2, steps_per_round=60, max_rounds=6, tau_steps=120, runs_b32=50, runs_b1=100,
                    seeds=(0, 1, 2))


def load_data(budget: VisionBudget) -> dict:
    """``train`` (3,500), ``validation`` (500, carved from train) and ``test`` (1,000) splits of MNIST-5k."""
    split = load_mnist5k().train_test_split(test_size=0.2, seed=0, stratify_by_column="labels")
    carve = split["train"].train_test_split(test_size=budget.validation_examples, seed=0, stratify_by_column="labels")
    return {"train": carve["train"], "validation": carve["test"], "test": split["test"]}


def load_teacher(data: dict) -> tuple[ResNetForImageClassification, str]:
    """The from-scratch teacher, cached in ``benchmarks/.cache/resnet_mnist_teacher`` with its settings."""
    recorded = CACHED_TEACHER / "teacher_settings.json"
    if recorded.exists() and json.loads(recorded.read_text()) == TEACHER_SETTINGS:
        return ResNetForImageClassification.from_pretrained(CACHED_TEACHER), "reused benchmarks/.cache"
    set_seed(0)
    model = ResNetForImageClassification(ResNetConfig(**ARCHITECTURE))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench-resnet-"), num_train_epochs=4,
                             learning_rate=1e-3, per_device_train_batch_size=64, seed=0, save_strategy="no",
                             report_to=[], disable_tqdm=True, use_cpu=True)
    Trainer(model=model, args=args, train_dataset=data["train"]).train()
    model.save_pretrained(CACHED_TEACHER)
    recorded.write_text(json.dumps(TEACHER_SETTINGS))
    return model, "trained now (4 epochs on 3,500 images), cached in benchmarks/.cache"


def _inputs(batch_size: int, seq_len: int | None) -> dict:
    return {"pixel_values": torch.randn(batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(0))}


def _rmtkd_args(budget: VisionBudget, seed: int, quantile: float = 0.5) -> hf_rmtkd.RMTKDTrainingArguments:
    return hf_rmtkd.RMTKDTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-rmtkd-"), per_device_train_batch_size=64,
        per_device_eval_batch_size=128, learning_rate=5e-4, sites_per_round=budget.sites_per_round,
        distillation_steps_per_round=budget.steps_per_round, max_rounds=budget.max_rounds,
        spectrum_quantile=quantile, logging_steps=50, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True, seed=seed,
    )


def run_resnet_mnist(budget: VisionBudget) -> dict:
    """Run every row of the vision benchmark and return the result record."""
    data = load_data(budget)
    teacher, teacher_source = load_teacher(data)
    teacher.eval()
    calibration = data["train"].shuffle(seed=0).select(range(budget.calibration_examples))
    calibration_inputs = calibration.remove_columns("labels")

    def row(name, compress, notes, extra=None):
        return finish_row(name, teacher, compress, test=data["test"], collator=None, inputs=_inputs, seq_len=None,
                          runs_b32=budget.runs_b32, runs_b1=budget.runs_b1, notes=notes, extra=extra)[1]

    teacher_params = parameter_count(teacher)
    rows = {"teacher": {"accuracy": evaluate_accuracy(teacher, data["test"]),
                        "validation_accuracy": evaluate_accuracy(teacher, data["validation"]),
                        "params": teacher_params, "non_embedding_params": teacher_params,
                        "safetensors_bytes": checkpoint_bytes(teacher), "notes": teacher_source}}
    print(f"[teacher] accuracy {rows['teacher']['accuracy']:.4f}, params {teacher_params:,}", flush=True)

    seed_accuracies = []
    for seed in budget.seeds:
        set_seed(seed)
        result = row(f"rmtkd seed {seed}", lambda s=seed: run_rmtkd(
            teacher, _rmtkd_args(budget, s), train=data["train"], validation=data["validation"],
            calibration=calibration), "RMTKDTrainer, library defaults, schedule of the budget")
        seed_accuracies.append(result["accuracy"])
        rows.setdefault("rmtkd", result)
    rmtkd = rows["rmtkd"]
    rmtkd["seed_accuracies"] = seed_accuracies
    target, steps = rmtkd["params"], rmtkd["distillation_steps"]
    kd_args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench-kd-"), per_device_train_batch_size=64,
                                learning_rate=5e-4, logging_steps=50, save_strategy="no", report_to=[],
                                disable_tqdm=True, use_cpu=True, seed=budget.seeds[0])

    def matched(extra: dict, params: int) -> dict:
        deviation = params / target - 1
        return {**extra, "param_deviation_from_rmtkd": deviation, "matched": abs(deviation) <= MATCH_TOLERANCE,
                "distillation_steps": steps}

    rows["rmtkd_no_distillation"] = row("rmtkd_no_distillation", lambda: rmtkd_without_distillation(
        teacher, calibration_inputs, rounds=rmtkd["accepted_rounds"], sites_per_round=budget.sites_per_round,
        kinds=KINDS, min_rank=MIN_RANK, exclude=rmtkd["rolled_back_sites"]),
        "RMT-KD's rounds (calibrate the current model, cut the next sites), no training")

    ratio = match_parameter(lambda r: svd_rank_ratio_params(teacher, r), target, 0.01, 1.0, integer=False)
    rows["svd_rank_ratio"] = row("svd_rank_ratio", lambda: distil(
        svd_rank_ratio(teacher, ratio), teacher, data["train"], steps=steps, args=kd_args),
        f"every encoder conv factored through ceil({ratio:.3f} c_in) weight-SVD input directions, then KD",
        matched({"rank_ratio": ratio}, svd_rank_ratio_params(teacher, ratio)))

    sites = find_sites(teacher)
    measurements = measure_sites(collect_statistics(teacher, calibration_inputs, sites, batch_size=64,
                                                    progress=False), sites)
    energy = match_parameter(lambda t: pca_energy_params(teacher, measurements, t, kinds=KINDS, min_rank=MIN_RANK),
                             target, 0.05, 0.99999, integer=False)
    rows["pca_energy"] = row("pca_energy", lambda: distil(
        pca_energy(teacher, measurements, energy, kinds=KINDS, min_rank=MIN_RANK), teacher, data["train"],
        steps=steps, args=kd_args),
        f"every site cut to the fewest channels directions holding {energy:.4f} of its variance, then KD",
        matched({"energy_threshold": energy},
                pca_energy_params(teacher, measurements, energy, kinds=KINDS, min_rank=MIN_RANK)))

    for tau in (0.3, 0.5, 0.7):
        rows[f"tau_{tau}"] = row(f"tau_{tau}", lambda t=tau: distil(
            hf_rmtkd.compress(teacher, calibration_inputs, quantile=t, min_rank=MIN_RANK, batch_size=64,
                              progress=False), teacher, data["train"], steps=budget.tau_steps, args=kd_args),
            f"one-shot hf_rmtkd.compress (spectrum_quantile {tau}, every site at once) + {budget.tau_steps} KD steps",
            {"distillation_steps": budget.tau_steps})

    return {
        "benchmark": "resnet_mnist",
        "environment": environment(list(budget.seeds)),
        "budget": asdict(budget),
        "architecture": ARCHITECTURE,
        "data": {"train": len(data["train"]), "validation": len(data["validation"]), "test": len(data["test"]),
                 "test_description": "all 1,000 test images of the stratified 20% split of MNIST-5k (seed 0)",
                 "calibration_examples": budget.calibration_examples},
        "timing_input": "random 1x28x28 images; batch 32 (throughput), batch 1 (latency); teacher and row model "
                        "alternating in one process",
        "match_tolerance": MATCH_TOLERANCE,
        "rows": rows,
    }
