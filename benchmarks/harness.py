"""Shared pieces of the benchmarks: evaluation, the RMT-KD run, row bookkeeping and the environment record."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from baselines import distil, rmtkd_without_distillation
from measure import checkpoint_bytes, embedding_parameters, measure_row, rapl_files, timed
from torch import nn
from transformers import Trainer, TrainingArguments, set_seed

import hf_rmtkd
from hf_rmtkd.bench import cpu_name, parameter_count
from hf_rmtkd.metrics import compute_accuracy
from hf_rmtkd.utils import write_text_atomic

__all__ = [
    "RowBook", "Rows", "cached_teacher", "environment", "evaluate_accuracy", "finish_row", "majority_class_accuracy",
    "run_rmtkd", "teacher_row",
]

TEACHER_SETTINGS = "teacher_settings.json"
PACKAGES = ("hf_rmtkd", "torch", "transformers", "datasets", "accelerate", "numpy", "psutil")


class RowBook:
    """The rows of one benchmark run, written to ``path`` after every row, so an interrupted run resumes there.

    With ``shared=True`` several processes (``run.py --worker``) fill one file: each row is made by the first process
    to claim it (a file under ``<path>.claims/`` naming its process id; a dead process's claim is taken over), and
    every write merges the rows the others saved meanwhile. Rows a process does not make are listed in ``left``.

    Example:
        >>> book = RowBook(Path("results/minilm_rt.partial.json"), resume=True)  # doctest: +SKIP
        >>> book.add("svd_uniform", lambda: {"accuracy": 0.8, "params": 4_500_000})  # doctest: +SKIP
    """

    def __init__(self, path: os.PathLike | None, *, resume: bool, shared: bool = False, make_timed: bool = True):
        self.path = path
        self.shared = shared
        self.make_timed = make_timed  # False: leave timed rows to a process that has the machine to itself
        self.left: list[str] = []
        self.asked: list[str] = []  # the names add() was called with, in the benchmark's order
        self.rows: dict[str, dict] = {}
        if (resume or shared) and path is not None and os.path.exists(path):
            self.rows = self._saved_rows()
            print(f"Resuming: {len(self.rows)} rows already in {path}: {', '.join(self.rows)}", flush=True)

    def add(self, name: str, make, *, timed: bool = False) -> dict | None:
        """Return row ``name``: the saved one when resuming, else ``make()`` (a dict), saved before returning.

        Returns None, and lists the row in ``left``, when it is timed and this book does not make timed rows, or when
        another live process has claimed it.
        """
        self.asked.append(name)
        if self.shared:
            self._merge_saved()
        if name in self.rows:
            return self.rows[name]
        if (timed and not self.make_timed) or (self.shared and not self._claim(name)):
            self.left.append(name)
            return None
        try:
            row = make()
            with self._locked():
                if self.shared:  # the rows the other processes saved while this one was made
                    self._merge_saved()
                self.rows[name] = row
                if self.path is not None:
                    write_text_atomic(self.path, json.dumps({"rows": self.rows}, indent=1))
        finally:
            if self.shared:
                self._claim_file(name).unlink(missing_ok=True)
        return row

    def rows_in_order(self) -> dict[str, dict]:
        """The rows in the order the benchmark asks for them: a resumed or shared file holds them in the order they
        were finished, which is not the order a reader of the table expects."""
        return {name: self.rows[name] for name in self.asked if name in self.rows}

    def unmade(self) -> list[str]:
        """The rows in ``left`` that no process has saved yet (another worker may have finished some since)."""
        saved = self._saved_rows()
        return [name for name in self.left if name not in saved]

    def _merge_saved(self) -> None:
        self.rows = {**self._saved_rows(), **self.rows}

    def _saved_rows(self) -> dict:
        if self.path is None or not os.path.exists(self.path):
            return {}
        return json.loads(Path(self.path).read_text())["rows"]

    def _claim_file(self, name: str) -> Path:
        return Path(f"{self.path}.claims") / name

    def _claim(self, name: str) -> bool:
        claim = self._claim_file(name)
        claim.parent.mkdir(exist_ok=True)
        with self._locked():
            if claim.exists() and _process_alive(int(claim.read_text() or 0)):
                return False
            claim.write_text(str(os.getpid()))
            return True

    @contextlib.contextmanager
    def _locked(self):
        """Hold an exclusive lock on ``<path>.lock`` when shared (read-merge-write and claims must not interleave)."""
        if not self.shared:
            yield
            return
        with open(f"{self.path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def matmul_gflops(rows: int = 2048, inner: int = 768, columns: int = 3072, runs: int = 10) -> float:
    """This host's fp32 matrix-product speed at torch's current threads (GFLOP/s, median of ``runs``).

    Hosts differ between sessions even where the CPU model is the same (the paper-scale teacher's batch-32 forward
    pass took 1.17 s in one session and 2.05 s in another). The share of the FLOP ceiling a compressed model reaches
    depends on how fast the matrix products run next to everything else, so every result records this speed, and
    timings from different sessions can be told apart.
    """
    generator = torch.Generator().manual_seed(0)
    left, right = torch.randn(rows, inner, generator=generator), torch.randn(inner, columns, generator=generator)
    seconds = []
    with torch.inference_mode():
        for run in range(runs + 3):  # 3 warm-up products
            started = time.perf_counter()
            left @ right
            if run >= 3:
                seconds.append(time.perf_counter() - started)
    return round(2 * rows * inner * columns / statistics.median(seconds) / 1e9, 1)


def environment(seeds: list[int], script: str = "run.py") -> dict:
    """Command, package versions, CPU, threads and seeds: what a reader needs to reproduce or discount a number.

    Args:
        seeds: the seeds the run used.
        script: the file under ``benchmarks/`` that was run (the command records it with this process's arguments).

    Returns:
        The environment record of a result file.
    """
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            versions[name] = getattr(sys.modules.get(name), "__version__", "unknown")
    return {
        "command": "python " + " ".join([f"benchmarks/{script}", *sys.argv[1:]]),
        "python": platform.python_version(),
        "versions": versions,
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "matmul_gflops_at_start": matmul_gflops(),
        "rapl": "available" if rapl_files() else "unavailable (no readable /sys/class/powercap/intel-rapl*)",
        "seeds": seeds,
    }


def predict_logits(model: nn.Module, dataset, *, collator=None, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, labels)`` of ``model`` on ``dataset`` (which has a ``labels`` column)."""
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench-eval-"), per_device_eval_batch_size=batch_size,
                             report_to=[], disable_tqdm=True, use_cpu=True)
    try:
        output = Trainer(model=model, args=args, data_collator=collator).predict(dataset)
    finally:
        shutil.rmtree(args.output_dir, ignore_errors=True)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    return logits, output.label_ids


def evaluate_accuracy(model: nn.Module, dataset, *, collator=None, batch_size: int = 64) -> float:
    """Accuracy of the arg-max prediction of ``model`` on ``dataset`` (which has a ``labels`` column)."""
    logits, labels = predict_logits(model, dataset, collator=collator, batch_size=batch_size)
    return float((np.argmax(logits, -1) == labels).mean())


def cached_teacher(cache: Path, settings: dict, model_class, config, args: TrainingArguments, *, train, validation,
                   collator=None) -> tuple[nn.Module, str]:
    """A teacher trained from scratch once and cached in ``cache``; loaded from there while ``settings`` match.

    Trained with ``args`` (which should evaluate and save regularly and load the best checkpoint at the end, so that no
    student distilled for longer than the teacher trained gains from the teacher being under-trained). The
    checkpoints go to ``<cache>.checkpoints`` (it replaces ``args.output_dir``) next to a copy of ``settings``: a
    training cut off (by the end of a session, say) resumes from its last checkpoint when called again with the same
    settings, and starts over with other settings. The cache's settings file is written last and the checkpoints
    removed after it: an interrupted save is trained again, never loaded half-written.

    Args:
        cache: the folder (a `from_pretrained` checkpoint plus ``teacher_settings.json``).
        settings: what the teacher is trained with; a cache made with other settings is trained again.
        model_class, config: the model, initialised as ``model_class(config)`` after seeding with ``args.seed``.
        args: the training arguments; their ``output_dir`` is replaced by the checkpoint folder.
        train, validation, collator: the data.

    Returns:
        ``(model, where it came from)``.
    """
    if _recorded_settings(cache) == settings:
        return model_class.from_pretrained(cache), f"reused benchmarks/.cache/{cache.name}"
    checkpoints = cache.with_name(cache.name + ".checkpoints")
    resume = _recorded_settings(checkpoints) == settings and any(checkpoints.glob("checkpoint-*"))
    if not resume:
        shutil.rmtree(checkpoints, ignore_errors=True)
        checkpoints.mkdir(parents=True)
        (checkpoints / TEACHER_SETTINGS).write_text(json.dumps(settings))
    args.output_dir = str(checkpoints)
    set_seed(args.seed)
    trainer = Trainer(model=model_class(config), args=args, train_dataset=train, eval_dataset=validation,
                      data_collator=collator, compute_metrics=compute_accuracy)
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.model.save_pretrained(cache)
    (cache / TEACHER_SETTINGS).write_text(json.dumps(settings))
    shutil.rmtree(checkpoints)
    how = "resumed from its last checkpoint" if resume else "trained now"
    return trainer.model, f"{how} ({settings}), cached in benchmarks/.cache/{cache.name}"


def _recorded_settings(folder: Path) -> dict | None:
    recorded = folder / TEACHER_SETTINGS
    return json.loads(recorded.read_text()) if recorded.exists() else None


def majority_class_accuracy(dataset) -> float:
    """The accuracy of always predicting ``dataset``'s most frequent label: the floor a teacher has to clear before
    an accuracy comparison with it means anything."""
    labels = np.asarray(dataset["labels"])
    return float(np.bincount(labels).max() / len(labels))


def run_rmtkd(teacher: nn.Module, args: hf_rmtkd.RMTKDTrainingArguments, *, train, validation, calibration,
              collator=None, trainer_class=hf_rmtkd.RMTKDTrainer) -> tuple[nn.Module, dict]:
    """Compress a copy of ``teacher`` with `hf_rmtkd.RMTKDTrainer` (or ``trainer_class``, a subclass) and return the
    model and what the run did.

    Returns:
        ``(model, info)`` with ``info``: ``distillation_steps`` (steps actually trained, all rounds and the final
        phase), ``final_distillation`` (what the final phase did),
        ``accepted_rounds``, ``rolled_back_sites``, ``stop_reason`` and the per-round ``log``.
    """
    trainer = trainer_class(
        model=copy.deepcopy(teacher), args=args, train_dataset=train, eval_dataset=validation,
        calibration_dataset=calibration, data_collator=collator, compute_metrics=compute_accuracy,
    )
    try:
        trainer.train()
    finally:
        shutil.rmtree(args.output_dir, ignore_errors=True)  # round checkpoints: not needed once the run is over
    log, final = trainer.rmtkd_log, trainer.rmtkd_final
    info = {
        "distillation_steps": len(log) * args.distillation_steps_per_round + (final["steps"] if final else 0),
        "final_distillation": final,
        "accepted_rounds": sum(entry["accepted"] for entry in log),
        "rolled_back_sites": sorted(site for entry in log if not entry["accepted"] for site in entry["sites"]),
        "stop_reason": trainer.rmtkd_stop_reason,
        "log": log,
    }
    return trainer.model.eval(), info


def export_sizes(model: nn.Module, export) -> dict:
    """Parameters and safetensors bytes of ``export`` (e.g. `hf_rmtkd.fold_batchnorm`) applied to a copy of ``model``:
    the deployed form's size, next to the trained form's. Empty without ``export``."""
    if export is None:
        return {}
    exported = export(copy.deepcopy(model))
    return {"export_params": parameter_count(exported), "export_safetensors_bytes": checkpoint_bytes(exported)}


def teacher_row(teacher: nn.Module, data: dict, *, notes: str, collator=None, export=None) -> dict:
    """The teacher's row: test and validation accuracy, the majority-class floor of the test split, its sizes (and its
    deployed form's, with ``export``) and where it came from (``notes``)."""
    params = parameter_count(teacher)
    return {"accuracy": evaluate_accuracy(teacher, data["test"], collator=collator),
            "validation_accuracy": evaluate_accuracy(teacher, data["validation"], collator=collator),
            "params": params, "non_embedding_params": params - embedding_parameters(teacher),
            "safetensors_bytes": checkpoint_bytes(teacher), **export_sizes(teacher, export),
            "majority_class_accuracy": majority_class_accuracy(data["test"]), "notes": notes}


def finish_row(name: str, teacher: nn.Module, compress, *, test, collator, inputs, seq_len, runs_b32: int,
               runs_b1: int, notes: str = "", extra: dict | None = None, export=None) -> tuple[nn.Module, dict]:
    """Compress (timed, memory sampled), evaluate on the test split and measure one row; print a one-line summary.

    Args:
        name: the row name.
        teacher: the uncompressed model (speed and FLOP reference).
        compress: ``() -> model`` or ``() -> (model, info)``; its wall time and peak memory are recorded.
        test, collator: the evaluation split and its collator.
        inputs, seq_len, runs_b32, runs_b1: as for `measure.measure_row`.
        notes: how the row was made, for the result file.
        extra: more fields for the row.
        export: ``model -> model``, the deployed form whose size is recorded too (`export_sizes`).
    """
    produced, seconds, memory = timed(compress)
    model, info = produced if isinstance(produced, tuple) else (produced, {})
    model.eval()
    row = {"accuracy": evaluate_accuracy(model, test, collator=collator), "compression_seconds": round(seconds, 1),
           **memory, **measure_row(teacher, model, inputs, seq_len=seq_len, runs_b32=runs_b32, runs_b1=runs_b1),
           **export_sizes(model, export), **info, **(extra or {}), "notes": notes}
    print(f"[{name}] accuracy {row['accuracy']:.4f}, params {row['params']:,}, x{row['throughput_ratio_b32']:.2f} "
          f"b32, x{row['latency_ratio_b1']:.2f} b1, flops x{row['flop_ratio']:.2f}, {seconds:.0f} s", flush=True)
    return model, row


class Rows:
    """The rows of one benchmark, made the same way in every benchmark: timed rows, accuracy-only seed rows, sizes
    matched to RMT-KD's, and the rows that follow the baselines (τ sweep, extra seeds, the no-distillation ablation).

    Example:
        >>> rows = Rows(book, teacher, test=data["test"], collator=collator, inputs=inputs, seq_len=64,
        ...             runs_b32=50, runs_b1=100)  # doctest: +SKIP
        >>> rows.timed("svd_uniform", lambda: svd_uniform(teacher, 58), "weight SVD at rank 58")  # doctest: +SKIP
    """

    def __init__(self, book: RowBook, teacher: nn.Module, *, test, collator, inputs, seq_len, runs_b32: int,
                 runs_b1: int, export=None):
        self.book, self.teacher, self.test, self.collator = book, teacher, test, collator
        self.measure = dict(inputs=inputs, seq_len=seq_len, runs_b32=runs_b32, runs_b1=runs_b1, export=export)

    def timed(self, name: str, compress, notes: str, extra: dict | None = None) -> dict | None:
        """A full row (`finish_row`): accuracy, sizes, speed, memory."""
        return self.book.add(name, lambda: finish_row(name, self.teacher, compress, test=self.test,
                                                      collator=self.collator, notes=notes, extra=extra,
                                                      **self.measure)[1], timed=True)

    def accuracy_only(self, name: str, compress, extra: dict | None = None) -> dict | None:
        """Another seed of a row, or a row whose shapes (so speed) are another row's: accuracy and size only, plus
        ``extra`` fields."""
        def make():
            produced = compress()
            model, info = produced if isinstance(produced, tuple) else (produced, {})
            accuracy = evaluate_accuracy(model.eval(), self.test, collator=self.collator)
            print(f"[{name}] accuracy {accuracy:.4f}", flush=True)
            final = info.get("final_distillation")  # an RMT-KD run: what validation said of the model it returns
            validation = ({"validation_accuracy": final["eval_accuracy" if final["kept"] else "eval_accuracy_before"]}
                          if final else {})
            return {"accuracy": accuracy, "params": parameter_count(model), **validation, **(extra or {})}
        return self.book.add(name, make)

    @staticmethod
    def matched(extra: dict, params: int, *, target: int, steps: int, tolerance: float) -> dict:
        """A baseline's size record: its deviation from RMT-KD's count, whether within ``tolerance``, its steps."""
        deviation = params / target - 1
        return {**extra, "param_deviation_from_rmtkd": deviation, "matched": abs(deviation) <= tolerance,
                "distillation_steps": steps}

    def tau_sweep(self, calibration, train, *, steps: int, kd_args, min_rank: int, taus=(0.3, 0.5, 0.7)) -> None:
        """The σ² starting quantile τ, the one knob of the MP edge: a one-shot cut at each τ (no target) + KD."""
        for tau in taus:
            self.timed(f"tau_{tau}", lambda t=tau: distil(
                hf_rmtkd.compress(self.teacher, calibration, quantile=t, min_rank=min_rank, batch_size=64,
                                  progress=False), self.teacher, train, steps=steps, args=kd_args,
                data_collator=self.collator),
                f"one-shot hf_rmtkd.compress (spectrum_quantile {tau}, every site at once) + {steps} KD steps",
                {"distillation_steps": steps})

    def baselines(self, baselines: dict, names, seed: int) -> dict:
        """The timed rows of the baselines ``names`` at ``seed``; ``baselines``: name -> (make, notes, extra), where
        ``make(seed)`` builds and distils one. Returns the entries of those run."""
        chosen = {name: baselines[name] for name in names}
        for name, (make, notes, extra) in chosen.items():
            self.timed(name, lambda make=make: make(seed), notes, extra)
        return chosen

    def strongest_seeds(self, baselines: dict, seeds) -> None:
        """More seeds for the matched baseline most accurate at the first seed; ``baselines``: name -> (make, ...)."""
        matched = [name for name in baselines if self.book.rows.get(name, {}).get("matched")]
        if matched:
            strongest = max(matched, key=lambda name: self.book.rows[name]["accuracy"])
            for seed in seeds:
                self.accuracy_only(f"{strongest}_seed{seed}", lambda seed=seed: baselines[strongest][0](seed))

    def ablation(self, rmtkd_row: dict, calibration, *, sites_per_round: int, kinds, min_rank: int) -> None:
        """RMT-KD's accepted rounds (their τ and signal fraction) repeated with no distillation at all."""
        self.timed("rmtkd_no_distillation", lambda: rmtkd_without_distillation(
            self.teacher, calibration, sites_per_round=sites_per_round, kinds=kinds, min_rank=min_rank,
            exclude=rmtkd_row["rolled_back_sites"], rounds=[entry for entry in rmtkd_row["log"] if entry["accepted"]]),
            "RMT-KD's rounds at the τ and signal fraction each used (calibrate the current model, cut the next "
            "sites), no training")
