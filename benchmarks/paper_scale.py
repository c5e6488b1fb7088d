"""Opt-in paper-scale path: a BERT-base-shaped classifier trained from scratch on Rotten Tomatoes, then RMT-KD.

No BERT-base weights exist offline (see the project reference notes on the environment), so the model is
``BertConfig()`` (12 layers, d = 768, FFN 3072, 110M parameters) with random initialisation, trained on the task
first, then compressed with `RMTKDTrainer` at the library defaults. On 2 CPU cores the full path takes hours;
``--smoke`` keeps the shape of every layer but only 2 of them, and runs a few steps of each stage, to prove the code
path end to end.

Run: ``python benchmarks/run.py --paper-scale [--smoke]``; writes ``benchmarks/results/paper_scale[_smoke].json``.
"""

from __future__ import annotations

import tempfile
import time

from harness import environment, evaluate_accuracy, run_rmtkd
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_rmtkd
from hf_rmtkd.data import load_rotten_tomatoes, minilm_path, tokenize_dataset

__all__ = ["run_paper_scale"]


def run_paper_scale(smoke: bool = False) -> dict:
    """Train a BERT-base-shaped model from scratch on RT, compress it with RMT-KD and return the record.

    Args:
        smoke: 2 layers instead of 12, 64 training examples, 2 training steps, one round of 2 distillation steps.
    """
    started = time.perf_counter()
    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())  # bert-base-uncased WordPiece, vocab 30,522
    raw = load_rotten_tomatoes()
    carve = raw["train"].train_test_split(test_size=500, seed=0, stratify_by_column="label")
    train, validation, test = carve["train"], carve["test"], raw["test"]
    if smoke:
        train, validation, test = train.select(range(64)), validation.select(range(32)), test.select(range(32))
    data = {name: tokenize_dataset(split, tokenizer, max_length=64)
            for name, split in (("train", train), ("validation", validation), ("test", test))}
    collator = DataCollatorWithPadding(tokenizer)
    config = BertConfig(num_labels=2, num_hidden_layers=2 if smoke else 12)
    model = BertForSequenceClassification(config)

    train_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-paper-"), per_device_train_batch_size=8 if smoke else 32,
        max_steps=2 if smoke else -1, num_train_epochs=3, learning_rate=1e-4, warmup_steps=0.1, seed=0,
        save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
    )
    Trainer(model=model, args=train_args, train_dataset=data["train"], data_collator=collator).train()
    teacher_accuracy = evaluate_accuracy(model, data["test"], collator=collator)
    trained = time.perf_counter() - started

    args = hf_rmtkd.RMTKDTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-paper-rmtkd-"), per_device_train_batch_size=8 if smoke else 32,
        per_device_eval_batch_size=32, learning_rate=5e-5, sites_per_round=64 if smoke else 4,
        distillation_steps_per_round=2 if smoke else 100, max_rounds=1 if smoke else None,
        calibration_max_examples=32 if smoke else 512, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True, seed=0,
    )
    calibration = data["train"].select(range(args.calibration_max_examples))
    compressed, info = run_rmtkd(model, args, train=data["train"], validation=data["validation"],
                                 calibration=calibration, collator=collator)
    return {
        "benchmark": "paper_scale_smoke" if smoke else "paper_scale",
        "environment": environment([0]),
        "model": f"BertConfig() shape, {config.num_hidden_layers} layers, random init, trained from scratch on RT",
        "smoke": smoke,
        "teacher": {"accuracy": teacher_accuracy, "params": model.num_parameters()},
        "rmtkd": {"accuracy": evaluate_accuracy(compressed, data["test"], collator=collator),
                  "params": compressed.num_parameters(), **info},
        "test_examples": len(data["test"]),
        "train_seconds": round(trained, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
