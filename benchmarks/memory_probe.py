"""Peak inference memory of the teacher and its RMT-KD model: median RSS over fresh processes, and live tensor bytes.

The benchmarks' own inference peak (`measure.inference_peak_mb`) is the growth of peak RSS while a saved checkpoint
loads and one batch runs, in one fresh process. RSS includes what glibc's allocator keeps or hands back, so across
fresh processes the warm batch-32 figure moves by up to ±10 MB (five processes: MiniLM-L6 124 to 145 MB, its RMT-KD
model 54 to 61 MB), and it can even fall below the bytes the tensors provably hold (MiniLM-L6 at batch 1: 79 MB of
RSS growth for 87 MB of weights): a warm load puts its weights into heap pages the previous model left resident, while
the pages of the memory-mapped safetensors file count in as they are read. For each benchmark with a result file this
script measures both models at batch 1 and batch 32:

1. **Peak RSS**, the same `measure.inference_peak_mb`, in ``--processes`` fresh processes per model and batch (the
   two models alternating, the one that starts switching every process); each process's warm value and the median.
2. **Peak live tensor memory**: the largest number of bytes held by torch tensors at any moment while the checkpoint
   loads and the batch runs forward (weights, activations and the workspace kernels take from torch's allocator) —
   what ``torch.cuda.max_memory_allocated`` reports on a GPU. No allocator, page or library overhead enters it, so it
   is the same in every run (`live_tensor_peak_bytes`).
3. **What is held at the forward pass's peak** (`tensors_at_peak`): the module and operator running when the live
   activations peak, and each tensor alive then, named by the module that made it. It shows why activation memory
   does not fall with the parameters: the tensors alive at the peak are the ones at the residual width the cut keeps.

The models: the teacher the benchmark cached in ``benchmarks/.cache`` (if absent: its architecture with fresh
weights) and the RMT-KD model rebuilt from the shapes the ``rmtkd`` row's round log records, with fresh weights
(`shapes.rmtkd_shaped_model`): memory depends on shapes only. Inputs are the benchmark's: 64 random token ids per
text sequence (no padding), random 1x28x28 images for the ResNet.

Usage (after the benchmarks have written ``results/minilm_rt.json`` / ``results/resnet_mnist.json``):
    python benchmarks/memory_probe.py [--processes 5] [--only minilm_rt resnet_mnist] [--threads 2] [--row rmtkd]
Writes ``results/memory_probe.json`` (with ``--only``, the other benchmarks' entries already there are kept); then
``python benchmarks/run.py --report-only`` puts its table into the README.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
import transformers
from measure import inference_peak_mb
from shapes import rmtkd_shaped_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hf_rmtkd
from hf_rmtkd.utils import write_text_atomic

__all__ = ["live_tensor_peak_bytes", "load_checkpoint", "tensor_peak_mb", "tensors_at_peak", "weight_bytes"]

RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARKS = ("minilm_rt", "resnet_mnist")
BATCH_SIZES = (1, 32)
MB = 2**20


def live_tensor_peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` and return its result with the peak of the bytes it had allocated from torch's CPU allocator.

    Every allocation and free made through torch's CPU allocator while ``fn`` runs is recorded by the profiler
    (``profile_memory=True``) as a ``[memory]`` event of signed size; walked in time order, their running sum is the
    bytes of tensor memory ``fn`` holds at each moment, and its maximum is the peak. What existed before the call
    (the model's weights, the inputs) is not included; memory kernels take outside torch's allocator (e.g. a BLAS
    library's own scratch) is not seen. The raw events are read (``kineto_results``) rather than
    ``profile.events()``, which folds an operator's allocations into the operator and so loses their order.

    Verified on a case whose answer is known (`tests/test_memory_probe.py`): ``Linear(100, 300) -> ReLU ->
    Linear(300, 50)`` on a batch of 64 float32 rows holds at most the first Linear's output and the ReLU's output
    together, 64 x (300 + 300) x 4 = 153,600 bytes, and this returns exactly 153,600; with an in-place ReLU, 64 x
    (300 + 50) x 4 = 89,600 bytes, again exactly. Checked against an independent count as well (a
    ``TorchDispatchMode`` adding the bytes of every new storage an operator returns and subtracting them when the
    storage dies): MiniLM-L6 at batch 32 33.0 MB by both, its RMT-KD model 19.46 MB by both; the bottleneck ResNet
    1.5315 MB against 1.5313 MB (the 256 bytes are a convolution's workspace, which no operator returns). The result
    is the same at 1 and 2 threads.

    Args:
        fn: the work to measure, called once with no arguments.

    Returns:
        ``(fn's result, peak bytes above the allocations in place when fn started)``.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        result = fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted((event for event in profile.profiler.kineto_results.events()
                     if event.name() == "[memory]" and event.device_type() == cpu), key=lambda event: event.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()  # negative for a free
        peak = max(peak, held)
    return result, peak


class _LiveTensors(TorchDispatchMode):
    """Every tensor an operator returns, with the module that was running, while it stays alive; and the moment the
    bytes held this way peaked."""

    def __init__(self, modules: list[str]):
        super().__init__()
        self.modules = modules  # the stack of modules running (forward pre-hooks push, forward hooks pop)
        self.live: dict[int, tuple[int, str]] = {}  # storage address -> (bytes, "module operator")
        self.peak, self.peak_at, self.held_at_peak = 0, "", []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        where = f"{self.modules[-1] if self.modules else '(model)'} {func.__name__.split('.')[0]}"
        # A view or an in-place result shares an input's storage (a weight's transpose, say): nothing new is held.
        inputs = {leaf.untyped_storage().data_ptr() for leaf in tree_leaves((args, kwargs))
                  if isinstance(leaf, torch.Tensor)}
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in inputs and storage.data_ptr() not in self.live:
                self.live[storage.data_ptr()] = (storage.nbytes(), where)
                weakref.finalize(tensor, self.live.pop, storage.data_ptr(), None)
        held = sum(nbytes for nbytes, _ in self.live.values())
        if held > self.peak:
            self.peak, self.peak_at = held, where
            self.held_at_peak = sorted(self.live.values(), key=lambda entry: (-entry[0], entry[1]))  # largest first
        return out


def tensors_at_peak(model: nn.Module, batch: dict, *, largest: int = 12) -> dict:
    """Where a forward pass's live activation memory peaks, and what is held there.

    Every tensor an operator returns is followed until it is freed (a ``TorchDispatchMode``); the module running is
    tracked by forward hooks. This counts what operators return, not a kernel's private workspace, so its peak can
    fall a little short of `live_tensor_peak_bytes` (MiniLM-L6's RMT-KD model at batch 32: 19.46 MB by both; its
    ``residual`` row 14.12 against 14.14 MB, the attention kernel's scratch).

    Args:
        model: the model, in eval mode.
        batch: its keyword inputs (they exist before and are not counted).
        largest: how many of the tensors held at the peak to list, largest first.

    Returns:
        ``peak_mb``, ``at`` (the module and operator running at the peak) and ``held``: ``[mb, "module operator"]``
        of the ``largest`` tensors alive then.
    """
    running: list[str] = []

    def entered(name: str):
        return lambda *_: running.append(name)  # None: the module's inputs stay as they are

    def left(*_) -> None:  # returns None: the module's output stays as it is
        running.pop()

    hooks = [handle for name, module in model.named_modules() if name for handle in (
        module.register_forward_pre_hook(entered(name)), module.register_forward_hook(left))]
    try:
        with torch.no_grad(), _LiveTensors(running) as tracker:
            model(**batch)
    finally:
        for handle in hooks:
            handle.remove()
    return {"peak_mb": tracker.peak / MB, "at": tracker.peak_at,
            "held": [[nbytes / MB, where] for nbytes, where in tracker.held_at_peak[:largest]]}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind ``model``'s parameters and buffers (tied weights counted once)."""
    storages = {}
    for tensor in (*model.parameters(), *model.buffers()):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def load_checkpoint(directory: str | os.PathLike) -> nn.Module:
    """The model saved in ``directory`` (a transformers or RMTKD checkpoint), in eval mode.

    The class is the config's first ``architectures`` entry, looked up in `hf_rmtkd` and then in transformers, as
    `measure.inference_peak_mb`'s fresh process does.
    """
    name = json.loads((Path(directory) / "config.json").read_text())["architectures"][0]
    cls = getattr(hf_rmtkd, name, None) or getattr(transformers, name)
    return cls.from_pretrained(directory).eval()


def tensor_peak_mb(checkpoint: str | os.PathLike, batch: dict) -> dict[str, float]:
    """Peak live tensor memory (MB) of loading ``checkpoint`` and running ``batch`` through it once (no_grad).

    Args:
        checkpoint: a folder written by ``save_pretrained``.
        batch: the model's keyword inputs (they exist before and are not counted, as in the RSS measure).

    Returns:
        ``weights`` (parameters and buffers), ``load`` (the peak while loading: above the weights when loading
        needs a transient copy), ``forward_above_weights`` (the forward pass's own peak: activations, workspace,
        output) and ``peak``: the larger of ``load`` and ``weights + forward_above_weights``.
    """
    model, load_peak = live_tensor_peak_bytes(lambda: load_checkpoint(checkpoint))
    weights = weight_bytes(model)
    with torch.no_grad():
        _, forward_peak = live_tensor_peak_bytes(lambda: model(**batch))
    return {"weights": weights / MB, "load": load_peak / MB, "forward_above_weights": forward_peak / MB,
            "peak": max(load_peak, weights + forward_peak) / MB}


def text_models() -> tuple[nn.Module, str, Callable[[nn.Module, int], dict], str]:
    """The text benchmark's teacher, where it came from, its input maker and a description of the input."""
    from text import FULL, MAX_LENGTH, teacher_cache  # imported here: the vision probe needs none of it

    from hf_rmtkd.bench import example_inputs
    from hf_rmtkd.data import minilm_path

    cache = teacher_cache(FULL)
    if (cache / "config.json").exists():
        teacher = transformers.AutoModelForSequenceClassification.from_pretrained(cache)
        source = f"the full-mode teacher cached in benchmarks/.cache/{cache.name}"
    else:  # memory depends on shapes only: the architecture with fresh weights measures the same
        config = transformers.AutoConfig.from_pretrained(minilm_path(), num_labels=2)
        teacher = transformers.AutoModelForSequenceClassification.from_config(config)
        source = "MiniLM-L6 architecture with fresh weights (no cached teacher)"
    return (teacher.eval(), source, lambda model, size: example_inputs(model, size, MAX_LENGTH),
            f"random token ids, seq len {MAX_LENGTH}, no padding")


def vision_models() -> tuple[nn.Module, str, Callable[[nn.Module, int], dict], str]:
    """The vision benchmark's teacher, where it came from, its input maker and a description of the input."""
    from vision import ARCHITECTURE, image_inputs, teacher_cache

    if (teacher_cache() / "config.json").exists():
        teacher = transformers.ResNetForImageClassification.from_pretrained(teacher_cache())
        source = f"the teacher cached in benchmarks/.cache/{teacher_cache().name}"
    else:
        teacher = transformers.ResNetForImageClassification(transformers.ResNetConfig(**ARCHITECTURE))
        source = "the benchmark's ResNet architecture with fresh weights (no cached teacher)"
    return teacher.eval(), source, lambda model, size: image_inputs(size), "random 1x28x28 images"


MODELS = {"minilm_rt": text_models, "resnet_mnist": vision_models}


def rss_peaks(checkpoints: dict[str, str], batch: dict, processes: int) -> dict[str, dict]:
    """`measure.inference_peak_mb` of each checkpoint in ``processes`` fresh processes, the models alternating.

    Returns:
        Per model: ``warm`` and ``cold`` (one value per process, in the order run) and their medians.
    """
    runs = {model: {"warm": [], "cold": []} for model in checkpoints}
    for process in range(processes):
        order = list(checkpoints) if process % 2 == 0 else list(reversed(checkpoints))  # no model always first
        for model in order:
            peak = inference_peak_mb(checkpoints[model], batch)
            runs[model]["warm"].append(peak["warm"])
            runs[model]["cold"].append(peak["cold"])
    for values in runs.values():
        values["warm_median"] = statistics.median(values["warm"])
        values["cold_median"] = statistics.median(values["cold"])
    return runs


def probe(name: str, processes: int, row_name: str = "rmtkd") -> dict:
    """Both measures for one benchmark's teacher and RMT-KD model (the shapes of row ``row_name``) at every batch
    size in `BATCH_SIZES`."""
    row = json.loads((RESULTS / f"{name}.json").read_text())["rows"][row_name]
    teacher, source, inputs, description = MODELS[name]()
    rmtkd = rmtkd_shaped_model(teacher, row["log"])
    if rmtkd.num_parameters() != row["params"]:
        raise RuntimeError(f"{name}: the rebuilt RMT-KD model has {rmtkd.num_parameters():,} parameters, the "
                           f"row {row['params']:,}: the logged shapes do not rebuild it")
    params = {"teacher": teacher.num_parameters(), "rmtkd": rmtkd.num_parameters()}
    entry = {"teacher": source, "rmtkd": f"rebuilt from the {row_name} row's round log, fresh weights",
             "input": description, "params": params, "param_ratio": params["rmtkd"] / params["teacher"],
             "batches": {}}
    with tempfile.TemporaryDirectory() as teacher_dir, tempfile.TemporaryDirectory() as rmtkd_dir:
        teacher.save_pretrained(teacher_dir)
        rmtkd.save_pretrained(rmtkd_dir)
        checkpoints = {"teacher": teacher_dir, "rmtkd": rmtkd_dir}
        for size in BATCH_SIZES:
            batch = inputs(teacher, size)
            tensors = {model: tensor_peak_mb(directory, batch) for model, directory in checkpoints.items()}
            held = {"teacher": tensors_at_peak(teacher, batch), "rmtkd": tensors_at_peak(rmtkd.eval(), batch)}
            rss = rss_peaks(checkpoints, batch, processes)
            entry["batches"][str(size)] = {
                "rss_mb": rss,
                "rss_warm_ratio": rss["rmtkd"]["warm_median"] / rss["teacher"]["warm_median"],
                "tensor_mb": tensors,
                "tensor_ratio": tensors["rmtkd"]["peak"] / tensors["teacher"]["peak"],
                "held_at_forward_peak": held,
            }
            print(f"[{name} b{size}] RSS warm median {rss['teacher']['warm_median']:.1f} -> "
                  f"{rss['rmtkd']['warm_median']:.1f} MB (x{entry['batches'][str(size)]['rss_warm_ratio']:.3f}); "
                  f"tensors {tensors['teacher']['peak']:.1f} -> {tensors['rmtkd']['peak']:.1f} MB "
                  f"(x{entry['batches'][str(size)]['tensor_ratio']:.3f}); params x{entry['param_ratio']:.3f}",
                  flush=True)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=5, help="fresh processes per model and batch (RSS)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="probe only these benchmarks")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, here and in the processes")
    parser.add_argument("--row", default="rmtkd",
                        help="the result row whose shapes are rebuilt; another row than rmtkd is stored as "
                        "'<benchmark> (<row>)'")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)  # `inference_peak_mb` passes this process's thread count on

    from harness import environment  # imported here: it pulls in the training stack, which the helpers above skip

    started = time.perf_counter()
    output = RESULTS / "memory_probe.json"
    previous = json.loads(output.read_text())["benchmarks"] if output.exists() else {}
    command = "python " + " ".join(["benchmarks/memory_probe.py", *sys.argv[1:]])
    benchmarks = {}
    for name in options.only or BENCHMARKS:
        if not (RESULTS / f"{name}.json").exists():
            print(f"[{name}] no results/{name}.json: skipped", flush=True)
            continue
        key = name if options.row == "rmtkd" else f"{name} ({options.row})"
        benchmarks[key] = {"command": command, "processes": options.processes, "threads": options.threads,
                           **probe(name, options.processes, options.row)}
    report = {
        "environment": environment([], script="memory_probe.py"),
        "command": command,
        "processes": options.processes,
        "threads": options.threads,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "rss_method": "measure.inference_peak_mb: peak RSS (VmHWM) growth while the checkpoint loads and the batch "
                      "runs, in a fresh process; cold = first load, warm = median of the next three",
        "tensor_method": "memory_probe.tensor_peak_mb: the most bytes held by torch tensors (CPU allocator, profiler "
                         "memory events) while the checkpoint loads and the batch runs forward, in this process",
        # Entries of benchmarks not probed this time stay as they were; each records its own command.
        "benchmarks": {**{k: v for k, v in previous.items() if k not in benchmarks}, **benchmarks},
    }
    write_text_atomic(output, json.dumps(report, indent=2))  # an interrupted write keeps the old file
    print(f"Wrote {output.relative_to(RESULTS.parent.parent).as_posix()} in {report['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
