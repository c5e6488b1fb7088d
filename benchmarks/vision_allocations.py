"""How many channel directions each vision site keeps, per cross-validation fold: the MP outlier counts against PCA
energy's ranks (planner only, no training).

For each fold's teacher (`vision.fold_teacher_settings`, trained on first use) and its 256 calibration images, prints
and records the outlier count of every site under each noise-variance estimator and τ asked for, and the ranks of
the PCA-energy baseline at the threshold that matches RMT-KD's size. It shows what the cross-validation table
(`vision_folds.py`) cannot: where the two allocations differ, and how steady each count is from fold to fold.

Run: ``python benchmarks/vision_allocations.py [--folds 0 1 2 3 4] [--quantiles 0.5 0.3 0.2]
[--estimators mp_fit mp_quantile] [--params 111078]``; writes ``benchmarks/results/vision_allocations.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import vision
from baselines import energy_rank

from hf_rmtkd.calibration import recount
from hf_rmtkd.spectrum import ESTIMATORS
from hf_rmtkd.utils import write_text_atomic

OUTPUT = Path(__file__).resolve().parent / "results" / "vision_allocations.json"


def fold_allocations(fold: int, quantiles, estimators, params: int) -> dict:
    """One fold's per-site widths (d), outlier counts per estimator and τ, and matched PCA-energy ranks."""
    data = vision.load_data(vision.FULL, fold=fold)
    teacher, _ = vision.load_teacher(data, vision.fold_teacher_settings(fold))
    teacher.eval()
    calibration = data["train"].shuffle(seed=0).select(range(vision.FULL.calibration_examples))
    measurements = vision.site_measurements(teacher, calibration.remove_columns("labels"))
    energy = vision.matched_energy(teacher, measurements, params)
    counts = {f"{estimator} tau {quantile}": [m.outliers.k for m in recount(measurements, estimator=estimator,
                                                                              quantile=quantile)]
              for estimator in estimators for quantile in quantiles}
    return {"d": [m.d for m in measurements], **counts, "pca_energy_threshold": energy,
            "pca_energy": [energy_rank(m.eigenvalues, energy) for m in measurements]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, nargs="+", default=list(range(vision.FOLDS)))
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.5, 0.3, 0.2])
    parser.add_argument("--estimators", choices=ESTIMATORS, nargs="+", default=list(ESTIMATORS))
    parser.add_argument("--params", type=int, default=111078, help="the size PCA energy is matched to")
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    folds = {}
    for fold in options.folds:
        folds[fold] = fold_allocations(fold, options.quantiles, options.estimators, options.params)
        for name, ranks in folds[fold].items():
            print(f"fold {fold}  {name:<20} {ranks}", flush=True)
    record = {"params": options.params, "sites": "the 12 conv_inner sites, stage by stage", "folds": folds}
    write_text_atomic(OUTPUT, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
