"""RMT-KD demo on real data, offline: the covariance spectra of a pretrained MiniLM-L6 on Rotten Tomatoes reviews.

Runs all-MiniLM-L6-v2 (6 layers, d=384, FFN 1536) over 10% of the Rotten Tomatoes training split (max 64 tokens,
padded per batch), measures the covariance spectrum at every site, and counts the eigenvalues above the
Marchenko–Pastur edge: the directions RMT-KD would keep. Prints the per-site table and writes the report and one plot
per site to ``demo_out/analysis/``.

Run with ``make demo`` (or ``python examples/demo.py``); a few minutes at most on 2 CPU cores.
"""

import time
from pathlib import Path

from transformers import AutoModel, AutoTokenizer

import hf_rmtkd
from hf_rmtkd.data import calibration_subset, load_rotten_tomatoes, minilm_path, tokenize_dataset

OUT = Path("demo_out") / "analysis"


def main() -> None:
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path()).eval()

    train = load_rotten_tomatoes()["train"]
    calibration = tokenize_dataset(calibration_subset(train, fraction=0.1, seed=0), tokenizer, max_length=64)
    print(f"Calibration: {len(calibration)} of {len(train)} Rotten Tomatoes training reviews, at most 64 tokens.")

    report = hf_rmtkd.analyze(model, calibration, batch_size=32)
    report.model_name = "sentence-transformers/all-MiniLM-L6-v2"
    print(report.table())

    report_path = report.to_json(OUT / "rmtkd_report.json")
    plots = report.plot(OUT)
    kept = sum(site.k for site in report) / sum(site.d for site in report)
    print(f"\nKept {kept:.1%} of all directions across {len(report)} sites.")
    print(f"Report: {report_path}\nPlots:  {len(plots)} PNG files in {OUT}/")
    print(f"Done in {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
