"""One-shot `compress` of MiniLM-L6 fine-tuned on Rotten Tomatoes, per reduction kind, before any distillation.

Measures, for each kind alone and for all kinds together: parameters before/after and test accuracy right after the
cut; and, for ``ffn_width``, the two cut methods (whole-neuron selection with a least-squares refit vs the paper's
rotation fold). Calibration is measured once (512 training reviews) and every variant cuts a copy of the teacher.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compress_per_kind.py`` (about 10 minutes on 2 cores; the
fine-tuned teacher is cached in ``benchmarks/.cache/``). Writes ``benchmarks/results/compress_per_kind.json``.
"""

import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

import hf_rmtkd
from hf_rmtkd.architectures import find_sites
from hf_rmtkd.calibration import collect_statistics, measure_sites
from hf_rmtkd.cut import apply_plan
from hf_rmtkd.data import calibration_subset, load_rotten_tomatoes, minilm_path, tokenize_dataset
from hf_rmtkd.modeling import rmtkd_class_for
from hf_rmtkd.plan import plan_reductions

HERE = Path(__file__).parent
CACHE = HERE / ".cache" / "minilm_rt_teacher"
RESULT = HERE / "results" / "compress_per_kind.json"
VARIANTS = {
    "ffn_width (select)": dict(kinds=["ffn_width"], ffn_method="select"),
    "ffn_width (fold)": dict(kinds=["ffn_width"], ffn_method="fold"),
    "low_rank": dict(kinds=["low_rank"]),
    "embedding": dict(kinds=["embedding"]),
    "all kinds": dict(kinds=["ffn_width", "low_rank", "embedding"], ffn_method="select"),
}


def accuracy(eval_pred):
    return {"accuracy": float((np.argmax(eval_pred.predictions, -1) == eval_pred.label_ids).mean())}


def main():
    start = time.time()
    transformers.set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    rt = load_rotten_tomatoes()
    train = tokenize_dataset(rt["train"], tokenizer, max_length=64)
    test = tokenize_dataset(rt["test"].select(range(1000)), tokenizer, max_length=64)
    eval_args = TrainingArguments(output_dir=str(HERE / ".cache" / "eval"), per_device_eval_batch_size=64,
                                  report_to=[], disable_tqdm=True, use_cpu=True)

    if (CACHE / "config.json").exists():
        teacher = AutoModelForSequenceClassification.from_pretrained(CACHE)
    else:  # 4,096 reviews, one epoch: about 80% accuracy (reference/env.md)
        teacher = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        args = TrainingArguments(output_dir=str(CACHE.parent / "ft"), num_train_epochs=1, learning_rate=1e-4,
                                 per_device_train_batch_size=32, report_to=[], save_strategy="no", use_cpu=True,
                                 disable_tqdm=True, seed=0)
        Trainer(model=teacher, args=args, train_dataset=train.shuffle(seed=0).select(range(4096)),
                processing_class=tokenizer).train()
        teacher.save_pretrained(CACHE)

    def evaluate(model):
        trainer = Trainer(model=model, args=eval_args, processing_class=tokenizer, compute_metrics=accuracy)
        return trainer.evaluate(test)["eval_accuracy"]

    teacher.eval()
    teacher_accuracy = evaluate(teacher)
    calibration = calibration_subset(train, max_examples=512, seed=1).remove_columns("labels")
    sites = find_sites(teacher)
    statistics = collect_statistics(teacher, calibration, sites, batch_size=64)
    measurements = measure_sites(statistics, sites)

    rows = {}
    for name, options in VARIANTS.items():
        model = copy.deepcopy(teacher)
        plan = plan_reductions(measurements, model, kinds=options["kinds"], min_rank=8)
        entries = apply_plan(model, plan, measurements, ffn_method=options.get("ffn_method", "select"))
        wrapped = rmtkd_class_for(model).from_base(model, entries)
        rows[name] = {"params": wrapped.num_parameters(), "accuracy_after_cut": evaluate(wrapped),
                      "sites_cut": len(plan.cuts)}
        print(name, rows[name], flush=True)

    result = {
        "command": "python benchmarks/compress_per_kind.py",
        "model": "sentence-transformers/all-MiniLM-L6-v2 fine-tuned on 4,096 Rotten Tomatoes reviews (1 epoch)",
        "calibration": "512 training reviews, max 64 tokens; defaults: mp_fit, tau 0.5, Tracy-Widom edge, centred",
        "test": "first 1,000 reviews of the stratified 20% test split (seed 0)",
        "teacher": {"params": teacher.num_parameters(), "accuracy": teacher_accuracy},
        "variants": rows,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "hf_rmtkd": hf_rmtkd.__version__},
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "wall_seconds": round(time.time() - start, 1),
    }
    RESULT.write_text(json.dumps(result, indent=2))
    print(f"\n{'variant':22} {'params':>12} {'cut':>7} {'acc after cut':>14}")
    print(f"{'teacher':22} {teacher.num_parameters():>12,} {'':>7} {teacher_accuracy:>14.3f}")
    for name, row in rows.items():
        cut = 1 - row["params"] / teacher.num_parameters()
        print(f"{name:22} {row['params']:>12,} {cut:>7.1%} {row['accuracy_after_cut']:>14.3f}")


if __name__ == "__main__":
    main()
