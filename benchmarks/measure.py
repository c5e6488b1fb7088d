"""What every benchmark row measures besides accuracy: size, speed, FLOPs, memory and energy.

Speed follows the project's rule: the teacher and the row's model run alternately in this process
(`hf_rmtkd.bench.compare_speed`), and the ratio is teacher time ÷ model time (above 1: the model is faster). The FLOP
ratio, counted on the same batch, is the ceiling that ratio can approach.

Memory: the peak resident set size (RSS) of the benchmark process while a row is being compressed, sampled every
20 ms with psutil (it includes what the process already holds — teacher, data — so compare rows by their difference
to ``rss_before_mb``); and the inference peak, in a fresh process: the growth of peak RSS while the saved checkpoint
loads and one batch of 32 runs forward, for the row's model and the teacher. Energy comes from Intel RAPL counters
when they are readable, else it is recorded as ``"unavailable"``.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file
from torch import nn

from hf_rmtkd.bench import compare_speed, count_flops, parameter_count, safetensors_size

__all__ = [
    "MemorySampler", "checkpoint_bytes", "embedding_parameters", "energy_per_inference", "measure_row",
    "operator_times_ms", "rapl_files", "timed",
]

RAPL_GLOB = "/sys/class/powercap/intel-rapl*/energy_uj"


class MemorySampler:
    """Context manager recording the peak RSS of this process (MB) while its block runs."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.rss_before_mb = self.peak_mb = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.process.memory_info().rss / 2**20)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self.rss_before_mb = self.peak_mb = self.process.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def to_dict(self) -> dict:
        return {"peak_rss_mb": round(self.peak_mb, 1), "rss_before_mb": round(self.rss_before_mb, 1),
                "memory_method": "psutil RSS of the benchmark process, sampled every 20 ms during compression"}


def operator_times_ms(model: nn.Module, batch: dict, runs: int, warmup: int = 3) -> dict[str, tuple[float, int]]:
    """Self CPU milliseconds per forward pass and calls per forward pass of every operator ``model`` runs on
    ``batch`` (torch's profiler, ``runs`` passes after ``warmup`` unprofiled ones, inference mode)."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(**batch)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            for _ in range(runs):
                model(**batch)
    return {event.key: (event.self_cpu_time_total / 1e3 / runs, event.count // runs)
            for event in profile.key_averages()}


def rapl_files() -> list[str]:
    """The readable RAPL energy counters (package domains); empty when RAPL is absent or not readable."""
    readable = []
    for path in sorted(glob.glob(RAPL_GLOB)):
        try:
            int(Path(path).read_text())
            readable.append(path)
        except (OSError, ValueError):
            continue
    return readable


def energy_per_inference(model: nn.Module, batch: dict, runs: int = 20) -> float | str:
    """Joules per forward pass of ``batch`` from RAPL package counters, or ``"unavailable"`` without RAPL.

    The counters measure the whole CPU package, so on a shared machine the figure includes other processes' work.
    """
    files = rapl_files()
    if not files:
        return "unavailable"

    def read() -> int:
        return sum(int(Path(path).read_text()) for path in files)

    model.eval()
    with torch.inference_mode():
        model(**batch)
        start = read()
        for _ in range(runs):
            model(**batch)
        used = read() - start  # a counter wrap-around in this window would make this negative: reported as is
    return used / 1e6 / runs


def embedding_parameters(model: nn.Module) -> int:
    """Parameters of the embedding layers (token, position, type embeddings and their norm, factored or not)."""
    return sum(p.numel() for name, p in model.named_parameters() if ".embeddings." in f".{name}")


def checkpoint_bytes(model: nn.Module) -> int:
    """Bytes of the ``.safetensors`` files ``model.save_pretrained`` writes (saved to a temporary folder)."""
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return safetensors_size(directory)


# Run in a fresh interpreter, so that nothing else the benchmark holds counts: the peak RSS above the imports while
# the checkpoint loads and one batch runs forward. The first load-and-forward ("cold") also pays the libraries' one-off
# first-call set-up (kernels, lazily imported modules, allocator arenas): about 18 MB for MiniLM-L6 and for its RMT-KD
# model alike. The later ones ("warm", after the first model is freed and the C heap trimmed) measure what the model
# itself needs.
_PEAK_SCRIPT = """
import ctypes, gc, json, statistics, sys
import torch, transformers, hf_rmtkd
from safetensors.torch import load_file

def status_kb(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

def peak_mb_of_load_and_forward():
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status_kb("VmRSS")
    model = cls.from_pretrained(sys.argv[1]).eval()
    with torch.no_grad():
        model(**batch)
    peak = (status_kb("VmHWM") - before) / 1024
    del model
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the next load cannot reuse them unseen
    return peak

torch.set_num_threads(int(sys.argv[3]))
batch = load_file(sys.argv[2])
name = json.load(open(sys.argv[1] + "/config.json"))["architectures"][0]
cls = getattr(hf_rmtkd, name, None) or getattr(transformers, name)
cold = peak_mb_of_load_and_forward()
warm = statistics.median(peak_mb_of_load_and_forward() for _ in range(3))
print(json.dumps({"cold": cold, "warm": warm}))
"""


_TEACHER_PEAK: dict[tuple, dict[int, dict[str, float]]] = {}


def inference_peak_mb(checkpoint: str, batch: dict) -> dict[str, float]:
    """Peak memory (MB of RSS) of loading the saved ``checkpoint`` folder and running ``batch`` through it, in a fresh
    process: ``{"cold": first load and forward, "warm": median of the next three}``.

    Measured as the process's peak RSS (``VmHWM``, reset just before each load) minus its RSS at that moment (Linux
    only). ``cold`` includes the libraries' one-off first-call set-up; ``warm`` is what the model itself needs.
    Both move by several MB between processes with the allocator's behaviour: `memory_probe.py` repeats this over
    fresh processes and adds a count of live tensor bytes that does not move.
    """
    with tempfile.TemporaryDirectory() as scratch:
        batch_file = str(Path(scratch) / "batch.safetensors")
        save_file({k: v.contiguous() for k, v in batch.items()}, batch_file)
        result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, checkpoint, batch_file,
                                 str(torch.get_num_threads())], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _size_and_peaks(model: nn.Module, batches: dict[int, dict]) -> tuple[int, dict[int, dict[str, float]]]:
    """Safetensors bytes of ``model`` and its inference peak at each ``{batch size: batch}``, from one save."""
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return safetensors_size(directory), {size: inference_peak_mb(directory, b) for size, b in batches.items()}


def measure_row(teacher: nn.Module, model: nn.Module, inputs: Callable[[int, int], dict], *, seq_len: int | None,
                runs_b32: int, runs_b1: int, warmup: int = 3) -> dict:
    """Size, speed, FLOPs, memory and energy of ``model`` against ``teacher``.

    Args:
        teacher: the uncompressed model.
        model: the row's model.
        inputs: ``(batch_size, seq_len) -> batch`` for both models.
        seq_len: sequence length of text batches (None for images).
        runs_b32, runs_b1: timed alternating rounds at batch 32 (throughput) and batch 1 (latency).
        warmup: untimed rounds before each timing.
    """
    params = parameter_count(model)
    batch = inputs(32, seq_len)
    # Batch 32 has activations at the unchanged hidden width; at batch 1 the weights dominate the peak.
    peak_batches = {32: batch, 1: inputs(1, seq_len)}
    size, peak_model = _size_and_peaks(model, peak_batches)
    b32 = compare_speed(teacher, model, inputs, batch_size=32, seq_len=seq_len, runs=runs_b32, warmup=warmup)
    b1 = compare_speed(teacher, model, inputs, batch_size=1, seq_len=seq_len, runs=runs_b1, warmup=warmup)
    flops_teacher, flops_model = count_flops(teacher, batch), count_flops(model, batch)
    key = (id(teacher), tuple((k, tuple(v.shape)) for k, v in batch.items()))
    if key not in _TEACHER_PEAK:  # the teacher is the same for every row of a benchmark: measure it once
        _TEACHER_PEAK[key] = _size_and_peaks(teacher, peak_batches)[1]
    peak_teacher = _TEACHER_PEAK[key]
    for timing in (b32, b1):
        timing["original_iqr_s"], timing["compressed_iqr_s"] = list(timing["original_iqr_s"]), list(
            timing["compressed_iqr_s"])
    memory = {}
    for size_ in (32, 1):
        for phase, prefix in (("cold", ""), ("warm", "warm_")):
            ours, theirs = peak_model[size_][phase], peak_teacher[size_][phase]
            memory[f"{prefix}inference_peak_mb_b{size_}"] = ours
            memory[f"teacher_{prefix}inference_peak_mb_b{size_}"] = theirs
            memory[f"{prefix}inference_memory_ratio_b{size_}"] = ours / theirs if theirs > 0 else None
    return {
        "params": params,
        "non_embedding_params": params - embedding_parameters(model),
        "safetensors_bytes": size,
        "throughput_ratio_b32": b32["speedup"],
        "latency_ratio_b1": b1["speedup"],
        "flop_ratio": flops_teacher / flops_model,
        "flops_b32": flops_model,
        "speed_vs_flop_ceiling_b32": b32["speedup"] / (flops_teacher / flops_model),
        **memory,
        "energy_j_per_inference_b1": energy_per_inference(model, inputs(1, seq_len)),
        "timing_b32": b32,
        "timing_b1": b1,
    }


def timed(fn: Callable[[], nn.Module]) -> tuple[nn.Module, float, dict]:
    """Run a compression ``fn`` and return its model, wall seconds and `MemorySampler` figures."""
    with MemorySampler() as memory:
        start = time.perf_counter()
        model = fn()
        seconds = time.perf_counter() - start
    return model, seconds, memory.to_dict()
