"""The ``hf-rmtkd`` command line.

Each subcommand is a pair of functions registered in `SUBCOMMANDS`: ``add_<name>_parser(subparsers)`` declares its
options and ``run_<name>(args)`` does the work. Subparsers are `transformers.HfArgumentParser`s, so a subcommand
built on a dataclass (e.g. `RMTKDTrainingArguments`) declares it with
``subparsers.add_parser("compress", dataclass_types=[...], help=...)`` and rebuilds it in its ``run_`` function with
``HfArgumentParser([...]).parse_dict(vars(args), allow_extra_keys=True)``.

Heavy imports (torch models, datasets, matplotlib) happen inside ``run_`` functions so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from transformers import HfArgumentParser

__all__ = ["build_parser", "main"]

MINILM_SHORTCUT = "minilm"
REPORT_FILE = "rmtkd_report.json"
SPECTRA_DIR = "spectra"


# --------------------------------------------------------------------------------------------------------------------
# analyze
# --------------------------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in its help, except when there is nothing useful to show (None, on/off flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0 or action.required:
            return action.help
        return super()._get_help_string(action)


def add_analyze_parser(subparsers) -> None:
    """Declare ``hf-rmtkd analyze``."""
    from .spectrum import EDGES, ESTIMATORS

    parser = subparsers.add_parser(
        "analyze",
        help="Measure the covariance spectra of a model on calibration data (changes nothing).",
        description=(
            "Run a model over a calibration subset, take the covariance spectrum of the hidden activations at each "
            "site, and count the eigenvalues above the Marchenko-Pastur edge (the directions RMT-KD would keep). "
            f"Writes OUT/{REPORT_FILE} and OUT/{SPECTRA_DIR}/*.png and prints a per-site table."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--model", required=True,
        help=f"Model folder or Hub id, loaded with AutoModel; '{MINILM_SHORTCUT}' is the offline all-MiniLM-L6-v2.",
    )
    parser.add_argument(
        "--dataset", required=True,
        help="Text dataset: 'rotten_tomatoes_offline', a local CSV/JSON/Parquet file, a save_to_disk folder, or a "
        "Hub name ('ag_news', 'glue/sst2', 'name:config').",
    )
    parser.add_argument("--text-column", default="text", help="Column of the dataset that holds the text.")
    parser.add_argument(
        "--label-column", default=None,
        help="Column holding the label (not needed for the analysis; default: 'label' when present).",
    )
    parser.add_argument("--split", default="train", help="Dataset split to draw the calibration subset from.")
    parser.add_argument("--fraction", type=_unit_interval("--fraction", closed_right=True), default=0.1,
                        help="Share of the split used for calibration, in (0, 1].")
    parser.add_argument("--max-examples", type=int, default=None, help="Cap on the number of calibration examples.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the calibration sample.")
    parser.add_argument("--max-length", type=int, default=64, help="Truncation length in tokens.")
    parser.add_argument("--batch-size", type=int, default=32, help="Sequences per forward pass.")
    parser.add_argument(
        "--estimator", choices=ESTIMATORS, default="mp_fit",
        help="Noise-variance estimator: 'mp_fit' (the paper's quantile start + histogram fit) or 'mp_quantile'.",
    )
    parser.add_argument(
        "--quantile", type=_unit_interval("--quantile"), default=0.5,
        help="tau, the spectrum quantile that starts the noise-variance estimate (larger keeps fewer directions).",
    )
    parser.add_argument(
        "--edge", choices=EDGES, default="tracy_widom",
        help="'tracy_widom': lambda+ plus a finite-sample margin; 'bare': the paper's lambda+.",
    )
    parser.add_argument(
        "--effective-samples", choices=("tokens", "sequences"), default="tokens",
        help="What counts as a sample n in q = d/n: every real token, or (more cautious) every sequence.",
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="Cap on the real tokens read per site.")
    parser.add_argument(
        "--no-centre", dest="centre", action="store_false",
        help="Do not subtract the mean activation before the eigen-decomposition.",
    )
    parser.add_argument(
        "--targets", nargs="+", default=None, metavar="PATTERN",
        help="Only these sites: roles (e.g. ffn_inner), globs or regexes over module paths. Default: all sites.",
    )
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="Skip the PNG plots.")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="Hide the progress bar.")
    parser.add_argument("--out", required=True, type=Path, help="Output folder for the report and the plots.")
    parser.set_defaults(run=run_analyze)


def _unit_interval(option: str, closed_right: bool = False):
    """An argparse type for a number in (0, 1) (or (0, 1]), checked before any model or data is loaded."""

    def parse(text: str) -> float:
        value = float(text)
        if not (0 < value < 1 or (closed_right and value == 1)):
            raise argparse.ArgumentTypeError(f"{option} must lie in (0, 1{']' if closed_right else ')'}, got {text}")
        return value

    return parse


def run_analyze(args: argparse.Namespace) -> None:
    """Load the model, tokenizer and data, analyse, and write the report and plots."""
    from transformers import AutoModel, AutoTokenizer

    from . import analyze
    from .data import MINILM_HUB_ID, calibration_subset, load_text_dataset, minilm_path, tokenize_dataset

    model_path, model_name = args.model, args.model
    if args.model == MINILM_SHORTCUT:
        model_path, model_name = minilm_path(), MINILM_HUB_ID
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()

    dataset = load_text_dataset(args.dataset, text_column=args.text_column, label_column=args.label_column)
    if args.split not in dataset:
        raise ValueError(f"Dataset '{args.dataset}' has no split '{args.split}'; pick --split from {list(dataset)}.")
    subset = calibration_subset(dataset[args.split], args.fraction, seed=args.seed, max_examples=args.max_examples)
    inputs = tokenize_dataset(subset, tokenizer, max_length=args.max_length)
    print(f"Analysing {model_name} on {len(inputs)} sequences of '{args.dataset}' ({args.split}).")

    report = analyze(
        model, inputs, targets=args.targets, centre=args.centre, estimator=args.estimator, quantile=args.quantile,
        edge=args.edge, effective_samples=args.effective_samples, max_tokens=args.max_tokens,
        batch_size=args.batch_size, progress=args.progress,
    )
    if not len(report):
        raise ValueError(f"No site of {model_name} matched --targets {args.targets}.")
    report.model_name = model_name
    report.settings.update(dataset=str(args.dataset), split=args.split, n_examples=len(inputs),
                           max_length=args.max_length, seed=args.seed)

    out = args.out
    report_path = report.to_json(out / REPORT_FILE)
    print(report.table())
    print(f"\nReport: {report_path}")
    if args.plots:
        plots = report.plot(out / SPECTRA_DIR)
        print(f"Plots:  {len(plots)} PNG files in {out / SPECTRA_DIR}")


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------

# One line per subcommand: the function that declares its parser (it sets `run` as the parser's default).
SUBCOMMANDS: list[Callable] = [add_analyze_parser]


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-rmtkd`` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="hf-rmtkd",
        description="RMT-KD for Hugging Face models: keep the eigen-directions above the Marchenko-Pastur edge, "
        "shrink the layers, self-distil.",
    )
    parser.add_argument("--traceback", action="store_true", help="Show the full traceback when a command fails.")
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=HfArgumentParser
    )
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-rmtkd``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, ImportError) as err:
        # Mistakes in options, paths or installs: one clear line rather than a traceback.
        if args.traceback:
            raise
        print(f"hf-rmtkd {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
