"""Pool the vision sweep's cross-validation runs: which setting is most accurate over all 4,000 training images?

One split of 500 validation images cannot tell the vision benchmark's settings apart (one image is 0.2 points, and
the settings differ on test by about 0.3). ``vision_sweep.py --fold K`` validates on the K-th of 5 stratified folds of
the training part (800 images) with a teacher trained on the other 3,200; this script groups those runs by setting
and reports, per setting, each fold's validation accuracy (the mean over its seeds), the accuracy pooled over the
folds, and the per-fold difference from the reference setting (the benchmark's RMT-KD row), whose spread over the
folds says whether a difference is more than noise. The test split is never touched.

Run (each fold's teacher trains once, about 2.5 min, then is cached; each run takes about a minute)::

    for seed in 0 1; do for fold in 0 1 2 3 4; do
      python vision_sweep.py --fold $fold --seed $seed                              # the benchmark's RMT-KD setting
      python vision_sweep.py --fold $fold --seed $seed --pca-energy-params 111078  # PCA energy at RMT-KD's size
      python vision_sweep.py --fold $fold --seed $seed --quantile 0.3              # and the other settings compared
      python vision_sweep.py --fold $fold --seed $seed --quantile 0.1
      python vision_sweep.py --fold $fold --seed $seed --estimator mp_quantile
      python vision_sweep.py --fold $fold --seed $seed --estimator mp_quantile --quantile 0.3
      python vision_sweep.py --fold $fold --seed $seed --cost-split 0.1
      python vision_sweep.py --fold $fold --seed $seed --residual                   # the opt-in residual kind
    done; done
    python vision_folds.py                     # prints the table, writes results/vision_folds.json
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import vision
from vision_sweep import KD_STEPS
from vision_sweep import RESULTS as SWEEP

from hf_rmtkd import RMTKDTrainingArguments
from hf_rmtkd.utils import write_text_atomic

OUTPUT = Path(__file__).resolve().parent / "results" / "vision_folds.json"
# What tells one setting from another in a sweep record; the rest (seed, fold, scores, sizes, times) is per run.
SETTING_KEYS = ("row", "quantile", "estimator", "target_search", "sites_per_round", "steps", "final_steps",
                "max_metric_drop", "learning_rate", "alpha", "hidden_weight", "kd_steps", "teacher_learning_rate",
                "teacher_epochs", "kinds")
_LIBRARY = RMTKDTrainingArguments.__dataclass_fields__
REFERENCE = {"row": "rmtkd", "quantile": vision.SPECTRUM_QUANTILE, "estimator": vision.SPECTRUM_ESTIMATOR,
             "target_search": _LIBRARY["target_search"].default,
             "sites_per_round": vision.FULL.sites_per_round, "steps": vision.FULL.steps_per_round,
             "final_steps": vision.FULL.final_steps, "max_metric_drop": vision.MAX_METRIC_DROP,
             "learning_rate": vision.LEARNING_RATE}
# The sweep's defaults for the rest of the setting keys: a run that changed one shows it in its label.
SHARED = {"alpha": _LIBRARY["distillation_alpha"].default,
          "hidden_weight": _LIBRARY["distillation_hidden_weight"].default, "kd_steps": KD_STEPS,
          "teacher_learning_rate": vision.TEACHER_SETTINGS["learning_rate"],
          "teacher_epochs": vision.TEACHER_SETTINGS["epochs"], "kinds": vision.KINDS}


def setting_of(record: dict) -> dict:
    """The settings a sweep record was made with (an RMT-KD run is the row ``rmtkd``)."""
    setting = {key: record[key] for key in SETTING_KEYS if key in record}
    setting.setdefault("row", "rmtkd")
    if setting["row"] != "pca_energy":  # runs from before ``--estimator`` counted outliers with the library's default
        setting.setdefault("estimator", "mp_fit")
    return setting


def label(setting: dict) -> str:
    """A name for a setting, one per setting: its row and every value that differs from the reference's (or from the
    sweep's default, for the keys the reference leaves out)."""
    baseline = {**SHARED, **REFERENCE}
    differs = ", ".join(f"{key} {value}" for key, value in setting.items() if key != "row" and value != baseline[key])
    return f"{setting['row']} ({differs})" if differs else setting["row"]


def pool(records: list[dict]) -> list[dict]:
    """Per setting with a run on every fold: each fold's accuracy (mean over seeds), the pooled accuracy, and the
    per-fold difference from the reference setting. Settings first by pooled accuracy."""
    runs = defaultdict(lambda: defaultdict(list))  # label -> fold -> [(accuracy, examples, params)]
    settings, seen = {}, set()
    for record in records:
        if record.get("fold") is None or record.get("teacher_only"):
            continue
        setting = setting_of(record)
        name = label(setting)
        if (name, record["fold"], record["seed"]) in seen:  # a run repeated with the same seed counts once
            continue
        seen.add((name, record["fold"], record["seed"]))
        settings[name] = setting
        runs[name][record["fold"]].append((record["validation_accuracy"], record["validation_examples"],
                                           record["params"]))
    folds = range(vision.FOLDS)
    complete = {name: by_fold for name, by_fold in runs.items() if all(by_fold[fold] for fold in folds)}
    fold_accuracy = {name: [statistics.fmean(run[0] for run in by_fold[fold]) for fold in folds]
                     for name, by_fold in complete.items()}
    reference = label(REFERENCE) if label(REFERENCE) in complete else None
    table = []
    for name, accuracies in fold_accuracy.items():
        examples = [complete[name][fold][0][1] for fold in folds]
        entry = {"setting": name, "settings": settings[name],
                 "seeds_per_fold": [len(complete[name][fold]) for fold in folds],
                 "fold_accuracy": accuracies,
                 "pooled_accuracy": sum(a * n for a, n in zip(accuracies, examples, strict=True)) / sum(examples),
                 "params": statistics.fmean(run[2] for fold in folds for run in complete[name][fold])}
        if reference is not None:
            differences = [a - r for a, r in zip(accuracies, fold_accuracy[reference], strict=True)]
            entry["difference_from_reference"] = {"mean": statistics.fmean(differences),
                                                  "std": statistics.stdev(differences), "per_fold": differences}
        table.append(entry)
    return sorted(table, key=lambda entry: -entry["pooled_accuracy"])


def main() -> None:
    records = [json.loads(line) for line in SWEEP.read_text().splitlines() if line.strip()]
    table = pool(records)
    record = {"folds": vision.FOLDS, "validation_examples_per_fold": 800, "reference": label(REFERENCE),
              "reference_settings": REFERENCE, "settings": table}
    write_text_atomic(OUTPUT, json.dumps(record, indent=1) + "\n")
    for entry in table:
        folds = " ".join(f"{a:.4f}" for a in entry["fold_accuracy"])
        difference = entry.get("difference_from_reference")
        versus = f"{difference['mean'] * 100:+.2f} ± {difference['std'] * 100:.2f} pt" if difference else ""
        print(f"{entry['setting']:<40} pooled {entry['pooled_accuracy']:.4f}  folds {folds}  "
              f"params {entry['params']:,.0f}  vs reference {versus}")


if __name__ == "__main__":
    main()
