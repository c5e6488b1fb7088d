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
# compress
# --------------------------------------------------------------------------------------------------------------------


def _model_option(parser, name: str = "--model", help: str = "") -> None:
    parser.add_argument(name, required=True, help=help + f" ('{MINILM_SHORTCUT}': the offline all-MiniLM-L6-v2).")


def _resolve_model(name: str) -> str:
    from .data import minilm_path

    return minilm_path() if name == MINILM_SHORTCUT else name


def add_compress_parser(subparsers) -> None:
    """Declare ``hf-rmtkd compress``: every `RMTKDTrainingArguments` field is an option."""
    from .training_args import RMTKDTrainingArguments

    parser = subparsers.add_parser(
        "compress",
        dataclass_types=[RMTKDTrainingArguments],
        help="Compress a classifier end to end with RMT-KD rounds and self-distillation.",
        description=(
            "Load a trained classifier and a labelled dataset (text/label or image/label columns), run RMTKDTrainer "
            "(calibrate, cut, distil, accept or roll back, round after round) and save the compressed checkpoint with "
            "its model card, spectra and report in --output_dir/compressed. Every RMTKDTrainingArguments field "
            "(including the transformers TrainingArguments) is an option."
        ),
    )
    _model_option(parser, help="A trained classifier (folder or Hub id)")
    parser.add_argument("--dataset", required=True, help="'rotten_tomatoes_offline', a local CSV/JSON/Parquet file, "
                        "a save_to_disk folder, or a Hub name ('glue/sst2', 'ag_news', 'cifar10').")
    parser.add_argument("--text_column", default="text", help="Column holding the text (text datasets).")
    parser.add_argument("--image_column", default=None, help="Column holding images (image datasets); switches the "
                        "input pipeline to the model's image processor.")
    parser.add_argument("--label_column", default="label", help="Column holding the class label.")
    parser.add_argument("--max_length", type=int, default=64, help="Truncation length of text inputs, in tokens.")
    parser.add_argument("--test_split", default=None, help="Split to evaluate on; default: 'test', 'validation', or a "
                        "stratified 20%% of the training split (seed 0) when there is neither.")
    parser.add_argument("--fold_batchnorm", action="store_true", help="Fold every BatchNorm into the convolution "
                        "before it once compression is done (CNNs such as ResNet): same outputs, a smaller "
                        "checkpoint, one operator less per convolution.")
    parser.add_argument("--fold_embeddings", action="store_true", help="Fold an encoder's embeddings into its "
                        "narrowed residual stream once compression is done (needs the residual and embedding kinds "
                        "among --reduction_kinds): same outputs, no full-width embedding sum.")
    parser.set_defaults(run=run_compress)


def _classification_data(args, model_path: str):
    """(train, eval, processing class) for a text or image classification dataset."""
    from .data import load_text_dataset, tokenize_dataset

    if args.image_column is None:
        from transformers import AutoTokenizer

        dataset = load_text_dataset(args.dataset, text_column=args.text_column, label_column=args.label_column)
        processor = AutoTokenizer.from_pretrained(model_path)
        dataset = tokenize_dataset(dataset, processor, max_length=args.max_length)
    else:
        import datasets
        from transformers import AutoImageProcessor

        dataset = datasets.load_from_disk(args.dataset) if Path(args.dataset).is_dir() else \
            datasets.load_dataset(args.dataset)
        processor = AutoImageProcessor.from_pretrained(model_path)
        for split in dataset.values():
            for column in (args.image_column, args.label_column):
                if column not in split.column_names:
                    raise ValueError(f"Dataset '{args.dataset}' has no column '{column}'; its columns are "
                                     f"{split.column_names}.")

        def encode(batch):
            return {"pixel_values": processor(batch[args.image_column], return_tensors="np")["pixel_values"],
                    "labels": batch[args.label_column]}

        dataset = dataset.map(encode, batched=True, remove_columns=dataset[next(iter(dataset))].column_names)
    split = args.test_split or next((s for s in ("test", "validation") if s in dataset), None)
    if split is None:
        parts = dataset["train"].train_test_split(test_size=0.2, seed=0)
        return parts["train"], parts["test"], processor
    if split not in dataset:
        raise ValueError(f"Dataset '{args.dataset}' has no split '{split}'; its splits are {list(dataset)}.")
    return dataset["train"], dataset[split], processor


def run_compress(args: argparse.Namespace) -> None:
    """Load, compress with `RMTKDTrainer`, save with the card, print a before/after summary."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    from . import RMTKDTrainer, RMTKDTrainingArguments, fold_batchnorm, fold_embeddings
    from .batchnorm_folding import batchnorm_pairs
    from .metrics import compute_accuracy

    training_args = HfArgumentParser(RMTKDTrainingArguments).parse_dict(vars(args), allow_extra_keys=True)[0]
    model_path = _resolve_model(args.model)
    train, test, processor = _classification_data(args, model_path)
    auto = AutoModelForSequenceClassification if args.image_column is None else AutoModelForImageClassification
    model = auto.from_pretrained(model_path)
    if args.fold_batchnorm and not batchnorm_pairs(model):
        raise ValueError(f"--fold_batchnorm: {type(model).__name__} has no BatchNorm after a convolution to fold.")
    if args.fold_embeddings and not {"residual", "embedding"} <= set(training_args.reduction_kinds):
        raise ValueError("--fold_embeddings folds the embeddings into a narrowed residual stream: add residual and "
                         f"embedding to --reduction_kinds (now {' '.join(training_args.reduction_kinds)}).")
    trainer = RMTKDTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                           processing_class=processor, compute_metrics=compute_accuracy)
    before = model.num_parameters()
    output = trainer.train()
    destination = Path(training_args.output_dir) / "compressed"
    if args.fold_batchnorm:
        trainer.model = fold_batchnorm(trainer.model)
    if args.fold_embeddings:
        trainer.model = fold_embeddings(trainer.model)
    trainer.save_model(str(destination))
    after = trainer.model.num_parameters()
    print(f"Parameters: {before:,} -> {after:,} ({after / before - 1:+.1%}); {trainer.rmtkd_stop_reason}.")
    print(f"{trainer.metric_name}: {trainer.rmtkd_baseline:.4f} before, {trainer._metric():.4f} after "
          f"({output.metrics['rmtkd_rounds']} rounds).")
    print(f"Checkpoint: {destination}")


# --------------------------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------------------------


def add_bench_parser(subparsers) -> None:
    """Declare ``hf-rmtkd bench``."""
    parser = subparsers.add_parser(
        "bench",
        help="Compare a compressed model with its original: size, speed (measured alternately), FLOPs, accuracy.",
        description="Parameters, safetensors size, batch-1 latency and batch-N throughput (both models timed "
        "alternately in this process, medians), analytic FLOPs and, with --dataset, accuracy. Writes JSON with "
        "--out and prints a table.",
        formatter_class=HelpFormatter,
    )
    _model_option(parser, "--original", help="The uncompressed model (folder or Hub id)")
    parser.add_argument("--compressed", required=True, help="The compressed checkpoint folder.")
    parser.add_argument("--batch-size", type=int, default=32, help="Batch size of the throughput measurement.")
    parser.add_argument("--seq-len", type=int, default=64, help="Sequence length of text inputs.")
    parser.add_argument("--runs", type=int, default=50, help="Timed runs per model and batch size (medians).")
    parser.add_argument("--threads", type=int, default=None, help="Intra-op threads (default: torch's setting).")
    parser.add_argument("--dataset", default=None, help="Optional labelled text dataset for accuracy (as compress).")
    parser.add_argument("--text-column", default="text", help="Column of --dataset holding the text.")
    parser.add_argument("--label-column", default="label", help="Column of --dataset holding the label.")
    parser.add_argument("--max-eval-examples", type=int, default=1000, help="Examples of --dataset to evaluate.")
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    parser.set_defaults(run=run_bench)


def _accuracy(model, dataset, batch_size: int = 64) -> float:
    import torch

    from .calibration import iterate_batches

    labels = torch.tensor(dataset["labels"])
    predictions = []
    with torch.inference_mode():
        for batch in iterate_batches(model, dataset, batch_size=batch_size):
            predictions.append(model(**batch).logits.argmax(-1))
    correct = int((torch.cat(predictions) == labels).sum())
    return correct / len(labels)


def run_bench(args: argparse.Namespace) -> None:
    """Measure and print the comparison."""
    import json

    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoModelForSequenceClassification

    from .bench import compare_speed, comparison_table, count_flops, example_inputs, format_speed

    original_path = _resolve_model(args.original)
    config = json.loads((Path(args.compressed) / "config.json").read_text())
    head = (config.get("architectures") or [""])[0]
    auto = AutoModelForSequenceClassification if "SequenceClassification" in head else AutoModel
    original = auto.from_pretrained(original_path).eval()
    compressed = auto.from_pretrained(args.compressed).eval()
    speeds = []
    for batch_size in tqdm((1, args.batch_size), desc="Timing", unit="batch size"):
        speeds.append(compare_speed(original, compressed, batch_size=batch_size, seq_len=args.seq_len,
                                    runs=args.runs, threads=args.threads))
    inputs = example_inputs(original, args.batch_size, args.seq_len)
    flops = (count_flops(original, inputs), count_flops(compressed, inputs))
    metrics = {}
    if args.dataset:
        from transformers import AutoTokenizer

        from .data import load_text_dataset, tokenize_dataset

        tokenizer = AutoTokenizer.from_pretrained(original_path)
        data = load_text_dataset(args.dataset, text_column=args.text_column, label_column=args.label_column)
        split = "test" if "test" in data else next(iter(data))
        data = tokenize_dataset(data[split], tokenizer, max_length=args.seq_len)
        data = data.select(range(min(len(data), args.max_eval_examples)))
        metrics["accuracy"] = (_accuracy(original, data), _accuracy(compressed, data))
    print(comparison_table(original, compressed, metrics=metrics, speeds=speeds, flops=flops,
                           flops_shape=f"batch {args.batch_size} x {args.seq_len}",
                           directories=(original_path, args.compressed)))
    for result in speeds:
        print(format_speed(result))
    if args.out:
        from .utils import write_text_atomic

        result = {"original": str(args.original), "compressed": str(args.compressed), "speed": speeds,
                  "flops": {"original": flops[0], "compressed": flops[1], "ratio": flops[0] / flops[1]},
                  "parameters": {"original": original.num_parameters(), "compressed": compressed.num_parameters()},
                  "accuracy": metrics.get("accuracy")}
        write_text_atomic(args.out, json.dumps(result, indent=2))
        print(f"Results: {args.out}")


# --------------------------------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------------------------------


def add_push_parser(subparsers) -> None:
    """Declare ``hf-rmtkd push``."""
    parser = subparsers.add_parser(
        "push",
        help="Push a saved RMT-KD checkpoint (weights, code, card, spectra, report) to the Hugging Face Hub.",
        description="Upload a checkpoint folder written by RMTKDTrainer.save_model, hf_rmtkd.save_rmtkd_checkpoint or "
        "hf-rmtkd compress. The token comes from huggingface_hub (HF_TOKEN or `hf auth login`) and is never written.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="The checkpoint folder.")
    parser.add_argument("--repo-id", required=True, help="The model repo, 'owner/name' (created if missing).")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument("--revision", default=None, help="Branch to push to.")
    parser.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing.")
    parser.add_argument("--commit-message", default="Upload RMT-KD compressed model", help="The commit message.")
    parser.set_defaults(run=run_push)


def run_push(args: argparse.Namespace) -> None:
    """Push the folder and print the commit URL."""
    from .hub import push_rmtkd_checkpoint

    url = push_rmtkd_checkpoint(args.checkpoint, args.repo_id, private=args.private or None, revision=args.revision,
                                create_pr=args.create_pr, commit_message=args.commit_message)
    print(f"Pushed: {url}")


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------

# One line per subcommand: the function that declares its parser (it sets `run` as the parser's default).
SUBCOMMANDS: list[Callable] = [add_analyze_parser, add_compress_parser, add_bench_parser, add_push_parser]


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
