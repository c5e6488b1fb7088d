"""Run the RMT-KD benchmarks and regenerate their summary, README table and frontier plot.

Usage (from the repository root, offline):
    python benchmarks/run.py --quick                   # one seed, subsets, < 20 min on 2 idle cores
    python benchmarks/run.py                           # full: 3 seeds (vision 10), whole test split, 50+ timed runs
    python benchmarks/run.py --quick --only minilm_rt  # one benchmark (the others' results are kept)
    python benchmarks/run.py --paper-scale --threads 2 # opt-in: BERT-base shape from scratch, then RMT-KD (~3 h)
    python benchmarks/run.py --paper-scale --smoke     # the same path with 2 layers and a few steps
    python benchmarks/run.py --resume                  # continue an interrupted run from its saved rows
    python benchmarks/run.py --report-only             # rebuild summary.json, README table and plot
    python benchmarks/run.py --worker --accuracy-only --threads 1  # in 2+ shells: they share the untimed rows,
    python benchmarks/run.py --resume                               # then alone: the timed rows and the results

Each benchmark writes ``benchmarks/results/<name>.json`` (command, versions, CPU, threads, seeds, every number);
then `report.regenerate` rebuilds ``results/summary.json``, ``results/frontier.png`` and the README section. Quick
runs write the same files under ``results/quick/`` and print their table: the README keeps the full results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARKS = ("minilm_rt", "resnet_mnist")


def _run(name: str, quick: bool, book) -> dict:
    # Imported here so that `--report-only` needs neither torch nor the data packages to be loaded.
    if name == "minilm_rt":
        import text

        return text.run_minilm_rt(text.QUICK if quick else text.FULL, book)
    import vision

    return vision.run_resnet_mnist(vision.QUICK if quick else vision.FULL, book)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, data subsets, short schedules")
    parser.add_argument("--only", choices=BENCHMARKS, action="append", help="run only these benchmarks")
    parser.add_argument("--paper-scale", action="store_true", help="BERT-base-shaped model trained from scratch")
    parser.add_argument("--smoke", action="store_true", help="with --paper-scale: 2 layers, a few steps")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows an interrupted run of the same mode saved in results/<name>.partial.json")
    parser.add_argument("--worker", action="store_true",
                        help="share results/<name>.<mode>.partial.json with other processes running the same mode: "
                        "each row is made by the first to claim it; the results are written once every row exists")
    parser.add_argument("--accuracy-only", action="store_true",
                        help="make only the untimed rows (extra seeds, same-shape variants); leave the timed ones "
                        "to a run that has the machine to itself")
    parser.add_argument("--report-only", action="store_true", help="only rebuild summary, README table and plot")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for everything, timings included (default: torch's choice). "
                        "On a machine shared with other jobs, 1 avoids OpenMP threads spinning against each other")
    options = parser.parse_args()
    if options.threads is not None:
        import torch

        torch.set_num_threads(options.threads)

    import report

    results = RESULTS / "quick" if options.quick else RESULTS
    results.mkdir(parents=True, exist_ok=True)
    if options.paper_scale:
        import paper_scale
        from harness import RowBook

        name = "paper_scale_smoke" if options.smoke else "paper_scale"
        partial = results / f"{name}.partial.json"
        book = RowBook(partial, resume=options.resume)
        resumed = list(book.rows)
        result = paper_scale.run_paper_scale(smoke=options.smoke, book=book)
        # Rows an interrupted run made are listed: their time is not in wall_seconds.
        result.update(mode="smoke" if options.smoke else "full", resumed_rows=resumed)
        (results / f"{name}.json").write_text(json.dumps(result, indent=2))
        partial.unlink(missing_ok=True)
        print(f"Wrote {results / f'{name}.json'}")
    elif not options.report_only:
        from harness import RowBook

        for name in options.only or BENCHMARKS:
            started = time.perf_counter()
            # Every finished row is saved here at once; the file is removed when the benchmark completes.
            partial = results / f"{name}.{'quick' if options.quick else 'full'}.partial.json"
            book = RowBook(partial, resume=options.resume, shared=options.worker,
                           make_timed=not options.accuracy_only)
            resumed = list(book.rows)
            result = _run(name, options.quick, book)
            while book.left:
                missing = book.unmade()
                if missing:
                    print(f"{name}: rows left to other runs: {', '.join(missing)}; the finished rows are in "
                          f"{partial}", flush=True)
                    break
                # Every row this run left to another worker exists now: go through once more to assemble them.
                book = RowBook(partial, resume=True, shared=options.worker, make_timed=not options.accuracy_only)
                result = _run(name, options.quick, book)
            if book.left:
                continue
            result["resumed_rows"] = resumed  # rows an earlier, interrupted run made: not in wall_seconds
            result["mode"] = "quick" if options.quick else "full"
            result["wall_seconds"] = round(time.perf_counter() - started, 1)
            (results / f"{name}.json").write_text(json.dumps(result, indent=2))
            partial.unlink(missing_ok=True)
            shutil.rmtree(f"{partial}.claims", ignore_errors=True)  # the workers' bookkeeping
            Path(f"{partial}.lock").unlink(missing_ok=True)
            print(f"{name}: {result['wall_seconds']:.0f} s, wrote {results / f'{name}.json'}", flush=True)
    report.regenerate(results, readme=None if options.quick else report.README)


if __name__ == "__main__":
    main()
