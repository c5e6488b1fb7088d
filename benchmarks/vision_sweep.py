"""Choose the vision benchmark's RMT-KD schedule on the validation split: one ``resnet_mnist`` RMT-KD row per setting.

Each run compresses the cached full-mode ResNet teacher with the ``rmtkd`` row's settings, except the schedule given
here (sites per round, steps per round, final steps, the per-round validation guard), and records what the final
model scores on the 500 validation images, how closely it follows the teacher there (arg-max agreement, mean
KL(teacher ‖ model)), its parameter count and why the run stopped. The test split is never touched.

Run: ``python benchmarks/vision_sweep.py [--sites-per-round N] [--steps N] [--final-steps N] [--max-metric-drop D]
[--learning-rate LR] [--quantile TAU] [--estimator E] [--target-search quantile] [--alpha A] [--hidden-weight B]
[--seed 0] [--threads 1] [--fold K]``, each default the benchmark's; ``--teacher-learning-rate`` /
``--teacher-epochs`` train another teacher (cached beside the benchmark's) and ``--teacher-only`` records just its
validation accuracy; ``--pca-energy-params N`` runs the PCA-energy baseline at that size instead, and
``--cost-split TAU`` a one-shot cut whose outliers (counted at τ) are shared out by their cost (`cost_split_ranks`),
both distilled for ``--kd-steps``. ``--fold K`` validates on the K-th of 5 folds of the training part (800 images)
with a teacher trained on the other 3,200 (`vision.load_data`); `vision_folds.py` pools the folds. Each run appends
one line to ``benchmarks/results/vision_sweep.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import vision
from baselines import cut_at_ranks, distil, pca_energy
from distillation_sweep import teacher_agreement
from harness import evaluate_accuracy, run_rmtkd

from hf_rmtkd.calibration import recount
from hf_rmtkd.plan import plan_reductions
from hf_rmtkd.spectrum import ESTIMATORS, signal_variances

RESULTS = Path(__file__).resolve().parent / "results" / "vision_sweep.jsonl"
KD_STEPS = 700  # the one-shot rows' distillation (--kd-steps): as many steps as the benchmark's RMT-KD run takes


def _record(record: dict) -> None:
    """Print one run's record and append it to ``results/vision_sweep.jsonl``."""
    print(json.dumps(record), flush=True)
    with RESULTS.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def cost_split_ranks(teacher, measurements, target: int) -> list:
    """The measurements with their outlier counts lowered, one direction at a time, until the plan leaves ``target``
    parameters: each step drops the kept outlier with the least signal (as a share of its site's signal) per
    parameter it costs (the plan's saving for one direction less at that site). No bulk direction is ever kept; unlike
    the library's equal signal fraction, directions in wide layers go first."""
    def ranked(ks):
        return [m.with_outliers(replace(m.outliers, k=k)) for m, k in zip(measurements, ks, strict=True)]

    def params(ks):
        plan = plan_reductions(ranked(ks), teacher, kinds=vision.KINDS, min_rank=vision.MIN_RANK)
        return teacher.num_parameters() - plan.params_saved

    ks = [m.outliers.k for m in measurements]
    shares = [(s / s.sum()).tolist() for s in (signal_variances(m.eigenvalues, m.outliers) for m in measurements)]
    full = params(ks)
    costs = [max(full - params([k - (j == i) for j, k in enumerate(ks)]), 1) for i in range(len(ks))]
    while params(ks) > target:
        open_sites = [i for i, k in enumerate(ks) if k > vision.MIN_RANK]
        if not open_sites:
            break
        ks[min(open_sites, key=lambda i: shares[i][ks[i] - 1] / costs[i])] -= 1
    return ranked(ks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites-per-round", type=int, default=vision.FULL.sites_per_round)
    parser.add_argument("--steps", type=int, default=vision.FULL.steps_per_round)
    parser.add_argument("--final-steps", type=int, default=vision.FULL.final_steps)
    parser.add_argument("--max-metric-drop", type=float, default=vision.MAX_METRIC_DROP)
    parser.add_argument("--learning-rate", type=float, default=vision.LEARNING_RATE)
    parser.add_argument("--quantile", type=float, default=vision.SPECTRUM_QUANTILE, help="spectrum_quantile τ")
    parser.add_argument("--estimator", choices=ESTIMATORS, default=vision.SPECTRUM_ESTIMATOR,
                        help="spectrum_estimator, the noise-variance estimator")
    parser.add_argument("--target-search", choices=["quantile"], default=None,
                        help="reach the parameter target by raising τ at every site (default: the library's "
                        "signal fraction)")
    parser.add_argument("--alpha", type=float, default=None, help="distillation_alpha (default: the library's)")
    parser.add_argument("--hidden-weight", type=float, default=None,
                        help="distillation_hidden_weight (default: the library's)")
    parser.add_argument("--teacher-learning-rate", type=float, default=vision.TEACHER_SETTINGS["learning_rate"])
    parser.add_argument("--teacher-epochs", type=int, default=vision.TEACHER_SETTINGS["epochs"])
    parser.add_argument("--teacher-only", action="store_true", help="train (or load) the teacher, record, stop")
    parser.add_argument("--pca-energy-params", type=int, default=None,
                        help="instead of RMT-KD: the PCA-energy baseline sized to this many parameters, distilled "
                        "for --kd-steps steps (is a gap between them on the test split there on validation too?)")
    parser.add_argument("--cost-split", type=float, default=None, metavar="TAU",
                        help="instead of RMT-KD: outliers counted at TAU, shared out by `cost_split_ranks` to the "
                        "benchmark's target, one-shot cut, distilled for --kd-steps steps")
    parser.add_argument("--kd-steps", type=int, default=KD_STEPS,
                        help="with --pca-energy-params or --cost-split: distillation steps")
    parser.add_argument("--residual", action="store_true",
                        help="the opt-in 'residual' kind before the default kinds (the rmtkd_residual row)")
    parser.add_argument("--fold", type=int, default=None,
                        help=f"validate on this of {vision.FOLDS} folds of the 4,000 training images (800), with a "
                        "teacher trained on the others (cached per fold), instead of the benchmark's 500 images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    budget = replace(vision.FULL, sites_per_round=options.sites_per_round, steps_per_round=options.steps,
                     final_steps=options.final_steps)
    data = vision.load_data(budget, fold=options.fold)
    base = vision.TEACHER_SETTINGS if options.fold is None else vision.fold_teacher_settings(options.fold)
    settings = {**base, "learning_rate": options.teacher_learning_rate, "epochs": options.teacher_epochs}
    teacher, _ = vision.load_teacher(data, settings)
    teacher.eval()
    teacher_record = {"fold": options.fold, "validation_examples": len(data["validation"]),
                      "teacher_only": options.teacher_only, "teacher_learning_rate": options.teacher_learning_rate,
                      "teacher_epochs": options.teacher_epochs,
                      "teacher_validation_accuracy": evaluate_accuracy(teacher, data["validation"])}
    if options.teacher_only:
        return _record(teacher_record)
    calibration = data["train"].shuffle(seed=0).select(range(budget.calibration_examples))
    if options.cost_split is not None or options.pca_energy_params is not None:  # a one-shot cut, then KD
        start = time.perf_counter()
        measurements = vision.site_measurements(teacher, calibration.remove_columns("labels"))
        if options.cost_split is not None:
            target = round(vision.TARGET_PARAMS * teacher.num_parameters())
            ranked = cost_split_ranks(teacher, recount(measurements, quantile=options.cost_split), target)
            model = cut_at_ranks(teacher, ranked, kinds=vision.KINDS, min_rank=vision.MIN_RANK)
            row = {"row": "cost_split", "quantile": options.cost_split,
                   "ranks": {path: entry.get("rank", entry.get("width"))
                             for path, entry in model.config.reductions.items()}}
        else:
            energy = vision.matched_energy(teacher, measurements, options.pca_energy_params)
            model = pca_energy(teacher, measurements, energy, kinds=vision.KINDS, min_rank=vision.MIN_RANK)
            row = {"row": "pca_energy", "energy_threshold": energy}
        distil(model, teacher, data["train"], steps=options.kd_steps, args=vision._kd_args(options.seed))
        return _record({**row, "kd_steps": options.kd_steps, "seed": options.seed,
                        "learning_rate": vision.LEARNING_RATE, "threads": options.threads,
                        "params": model.num_parameters(),
                        "validation_accuracy": evaluate_accuracy(model, data["validation"]), **teacher_record,
                        **teacher_agreement(model, teacher, data["validation"], None),
                        "seconds": round(time.perf_counter() - start, 1)})
    kinds = ("residual", *vision.KINDS) if options.residual else tuple(vision.KINDS)
    args = vision._rmtkd_args(budget, options.seed, quantile=options.quantile, estimator=options.estimator,
                              kinds=kinds)
    args.max_metric_drop, args.learning_rate = options.max_metric_drop, options.learning_rate
    if options.target_search is not None:
        args.target_search = options.target_search
    if options.alpha is not None:
        args.distillation_alpha = options.alpha
    if options.hidden_weight is not None:
        args.distillation_hidden_weight = options.hidden_weight
    start = time.perf_counter()
    model, info = run_rmtkd(teacher, args, train=data["train"], validation=data["validation"],
                            calibration=calibration)
    record = {"sites_per_round": options.sites_per_round, "steps": options.steps,
              "final_steps": options.final_steps, "max_metric_drop": options.max_metric_drop, "seed": options.seed,
              "learning_rate": args.learning_rate, "quantile": options.quantile, "estimator": options.estimator,
              "target_search": args.target_search,
              "alpha": args.distillation_alpha,
              "hidden_weight": args.distillation_hidden_weight,
              **({"kinds": list(kinds)} if options.residual else {}),  # absent: the defaults, as in earlier records
              "threads": options.threads, "params": model.num_parameters(),
              "target_params": round(vision.TARGET_PARAMS * teacher.num_parameters()),
              "stop_reason": info["stop_reason"], "accepted_rounds": info["accepted_rounds"],
              "rolled_back_sites": len(info["rolled_back_sites"]), "distillation_steps": info["distillation_steps"],
              "validation_accuracy": evaluate_accuracy(model, data["validation"]),
              **teacher_record,
              **teacher_agreement(model, teacher, data["validation"], None),
              "seconds": round(time.perf_counter() - start, 1)}
    _record(record)


if __name__ == "__main__":
    main()
