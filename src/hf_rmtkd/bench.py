"""Honest speed and size comparisons between a model and its compressed version.

Timings follow the rules of the project's design: both models run **in the same process, alternately** (A B, B A,
A B, ...), after a warm-up, under ``torch.inference_mode()``; the result holds medians (and quartiles) rather than
means, the ratio ``original ÷ compressed`` (above 1: the compressed model is faster), and everything needed to read
the number (batch size, sequence length, threads, CPU or GPU, torch version). The FLOP ratio from
`torch.utils.flop_counter.FlopCounterMode` is the ceiling a measured speed-up can approach, never pass.

Example:
    >>> from hf_rmtkd.bench import compare_speed, flop_ratio
    >>> result = compare_speed(model, small, batch_size=32, seq_len=64, runs=20)  # doctest: +SKIP
    >>> print(format_speed(result))  # doctest: +SKIP
    batch 32 x seq 64, 2 threads, <CPU model>, torch <version>: <ms> -> <ms> (x<ratio>, paired x<ratio>, CPU time ...)
    >>> flop_ratio(model, small, example_inputs(model, 32, 64))  # the ceiling of that ratio  # doctest: +SKIP
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = [
    "compare_speed",
    "comparison_table",
    "count_flops",
    "cpu_name",
    "example_inputs",
    "flop_ratio",
    "format_speed",
    "parameter_count",
    "safetensors_size",
]

Batch = Mapping[str, torch.Tensor] | torch.Tensor
InputsFn = Callable[[int, int], Batch]


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


def _base_config(model: nn.Module):
    """The config describing the model's inputs: an RMTKD wrapper's base config, else the model's own."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "base_model_config"):
        return config.base_model_config()
    return config


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def example_inputs(model: nn.Module, batch_size: int = 32, seq_len: int = 64, seed: int = 0) -> dict:
    """A random batch the model accepts, built from its config (only shapes matter for timing and FLOPs).

    Text models get ``input_ids`` drawn from the vocabulary (from id 1000, or above the special tokens of a small
    vocabulary) with an all-ones ``attention_mask``: no padding, so every sequence has ``seq_len`` real tokens. Vision
    models get ``pixel_values`` of shape (batch, num_channels, image_size, image_size).

    Args:
        model: a transformers model or an RMTKD model (its base config is read).
        batch_size: examples in the batch.
        seq_len: tokens per sequence (text models only).
        seed: the random seed.

    Returns:
        ``{"input_ids", "attention_mask"}`` or ``{"pixel_values"}``, on the model's device.

    Raises:
        ValueError: the config has neither ``vocab_size`` nor ``num_channels``; pass a batch instead.

    Example:
        >>> example_inputs(model, batch_size=2, seq_len=8)["input_ids"].shape  # doctest: +SKIP
        torch.Size([2, 8])
    """
    config = _base_config(model)
    generator = torch.Generator().manual_seed(seed)
    device = _device(model)
    if getattr(config, "vocab_size", None):
        vocab = config.vocab_size
        low = 1000 if vocab > 2000 else min(3, vocab - 1)  # past BERT's [unused]/special ids when there are any
        ids = torch.randint(low, vocab, (batch_size, seq_len), generator=generator)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if getattr(config, "num_channels", None):
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        pixels = torch.randn(batch_size, config.num_channels, size, size, generator=generator)
        return {"pixel_values": pixels.to(device)}
    raise ValueError(
        f"Cannot build example inputs for {type(model).__name__}: its config has neither `vocab_size` nor "
        "`num_channels`. Pass a batch (a dict of tensors) or an inputs function instead."
    )


def _call(model: nn.Module, batch: Batch):
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


def _batch_shape(batch: Batch) -> tuple[int, int | None]:
    """(batch size, sequence length or None) of a batch."""
    tensor = batch if isinstance(batch, torch.Tensor) else next(iter(batch.values()))
    if isinstance(batch, Mapping) and "input_ids" in batch:
        tensor = batch["input_ids"]
        return tensor.shape[0], tensor.shape[1]
    return tensor.shape[0], None


# --------------------------------------------------------------------------------------------------------------------
# Hardware
# --------------------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name: ``model name`` of ``/proc/cpuinfo`` when present (Linux), else `platform.processor()`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@contextmanager
def _threads(threads: int | None):
    """Run with ``threads`` intra-op threads (unchanged when None), restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------


def _quartiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, median, q3


def compare_speed(
    original: nn.Module,
    compressed: nn.Module,
    inputs: Batch | InputsFn | None = None,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    runs: int = 50,
    warmup: int = 3,
    threads: int | None = None,
) -> dict:
    """Time the forward pass of two models alternately, in this process, and return medians and their ratio.

    Each of the ``runs`` rounds times both models once, the order flipping every round (A B, B A, ...) so that
    neither always follows the other (caches, clock boosts, a neighbour's load); ``warmup`` untimed rounds come first.
    Both models see the same batch, under ``torch.inference_mode()``, in eval mode (their training flag is restored).
    On CUDA, each call is synchronised before the clock stops.

    Args:
        original: the reference model.
        compressed: the model to compare with it (same inputs).
        inputs: a batch (a dict of tensors, or one tensor passed positionally); or a function
            ``(batch_size, seq_len) -> batch``; or None: `example_inputs` of ``original``.
        batch_size: the batch size for an ``inputs`` function or `example_inputs` (default 32).
        seq_len: the sequence length for them (default 64). The result reports the shape of the batch actually timed
            (``seq_len`` None for vision models).
        runs: timed rounds (each times both models once); >= 1.
        warmup: untimed rounds before them.
        threads: intra-op threads during the timing (restored afterwards); None: the current count.

    Returns:
        A dict with ``original_s`` / ``compressed_s`` (median seconds per forward pass), ``original_iqr_s`` /
        ``compressed_iqr_s`` (first and third quartiles), ``speedup`` (ratio of the medians, original ÷ compressed:
        above 1 means the compressed model is faster; for a fixed batch it is also the throughput ratio),
        ``paired_speedup`` (median of the per-round ratios, robust to slow drifts of a shared machine),
        ``original_cpu_s`` / ``compressed_cpu_s`` / ``cpu_speedup`` (the same from process CPU time, which leaves
        out the time the process waited for a core: steadier on a busy machine, but with several threads it also
        counts their spin-waits, and it is not what a user waits for),
        ``original_examples_per_s`` / ``compressed_examples_per_s``, and the conditions: ``batch_size``,
        ``seq_len``, ``runs``, ``warmup``, ``threads``, ``device``, ``cpu``, ``gpu`` (or None), ``torch``.

    Example:
        >>> result = compare_speed(model, small, batch_size=1, seq_len=64, runs=50, threads=2)  # doctest: +SKIP
        >>> result["speedup"] > 1  # True when the compressed model answered faster  # doctest: +SKIP
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}.")
    batch_size = 32 if batch_size is None else batch_size
    seq_len = 64 if seq_len is None else seq_len
    if inputs is None:
        batch = example_inputs(original, batch_size, seq_len)
    elif callable(inputs):
        batch = inputs(batch_size, seq_len)
    else:
        batch = inputs
    # Report the shape actually timed (a given batch has its own; vision batches have no sequence length).
    batch_size, seq_len = _batch_shape(batch)
    device = _device(original)
    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    models = (original, compressed)
    modes = [model.training for model in models]
    times: tuple[list[float], list[float]] = ([], [])  # wall-clock seconds per call
    cpu_times: tuple[list[float], list[float]] = ([], [])  # process CPU seconds per call
    try:
        for model in models:
            model.eval()
        with _threads(threads), torch.inference_mode():
            for round_index in range(warmup + runs):
                order = (0, 1) if round_index % 2 == 0 else (1, 0)
                for which in order:
                    synchronise()
                    start, cpu_start = time.perf_counter(), time.process_time()
                    _call(models[which], batch)
                    synchronise()
                    if round_index >= warmup:
                        times[which].append(time.perf_counter() - start)
                        cpu_times[which].append(time.process_time() - cpu_start)
            used_threads = torch.get_num_threads()
    finally:
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)
    (o_q1, o_median, o_q3), (c_q1, c_median, c_q3) = _quartiles(times[0]), _quartiles(times[1])
    return {
        "original_s": o_median,
        "compressed_s": c_median,
        "original_iqr_s": (o_q1, o_q3),
        "compressed_iqr_s": (c_q1, c_q3),
        "speedup": o_median / c_median,
        "paired_speedup": statistics.median(o / c for o, c in zip(times[0], times[1], strict=True)),
        "original_cpu_s": statistics.median(cpu_times[0]),
        "compressed_cpu_s": statistics.median(cpu_times[1]),
        "cpu_speedup": statistics.median(cpu_times[0]) / statistics.median(cpu_times[1]),
        "original_examples_per_s": batch_size / o_median,
        "compressed_examples_per_s": batch_size / c_median,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "runs": runs,
        "warmup": warmup,
        "threads": used_threads,
        "device": str(device),
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }


def format_speed(result: dict) -> str:
    """One line describing a `compare_speed` result, conditions first.

    Example:
        >>> format_speed(compare_speed(model, small))  # doctest: +SKIP
        'batch 32 x seq 64, 2 threads, <CPU model>, torch <version>: <ms> -> <ms> (x<ratio>, paired x<ratio>, ...)'
    """
    shape = f"batch {result['batch_size']}" + (f" x seq {result['seq_len']}" if result["seq_len"] else "")
    hardware = result["gpu"] or result["cpu"]
    return (
        f"{shape}, {result['threads']} threads, {hardware}, torch {result['torch']}: "
        f"{result['original_s'] * 1e3:.1f} ms -> {result['compressed_s'] * 1e3:.1f} ms "
        f"(x{result['speedup']:.2f}, paired x{result['paired_speedup']:.2f}, CPU time x{result['cpu_speedup']:.2f})"
    )


# --------------------------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------------------------


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # PyTorch's FLOP table has the CUDA attention kernels but not the CPU one that `sdpa` dispatches to; without
    # this entry the attention products of every CPU forward pass would count as zero.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM_FLOPS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM_FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop


def count_flops(model: nn.Module, inputs: Batch) -> int:
    """FLOPs of one forward pass (matrix products, convolutions and attention; a multiply-add counts as 2).

    Counted with `torch.utils.flop_counter.FlopCounterMode`, under ``torch.inference_mode()`` in eval mode.
    Element-wise work (activations, norms, softmax) is not counted: it is the same in both models of a comparison and
    small beside the products.

    Args:
        model: the model.
        inputs: a batch (a dict of tensors, or one tensor passed positionally).

    Returns:
        The FLOP count.
    """
    mode = model.training
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS)
    try:
        model.eval()
        with counter, torch.inference_mode():
            _call(model, inputs)
    finally:
        model.train(mode)
    return counter.get_total_flops()


def flop_ratio(original: nn.Module, compressed: nn.Module, inputs: Batch | None = None) -> float:
    """FLOPs of ``original`` ÷ FLOPs of ``compressed`` on the same batch: the ceiling of the speed-up.

    Args:
        original: the reference model.
        compressed: the compressed model.
        inputs: the batch (default: `example_inputs` of ``original``, batch 32 × 64 tokens).

    Returns:
        The ratio (1.0 for identical architectures, 2.0 when the compressed model does half the work).

    Example:
        >>> flop_ratio(model, model)  # doctest: +SKIP
        1.0
    """
    inputs = example_inputs(original) if inputs is None else inputs
    return count_flops(original, inputs) / count_flops(compressed, inputs)


# --------------------------------------------------------------------------------------------------------------------
# Size
# --------------------------------------------------------------------------------------------------------------------


def parameter_count(model: nn.Module) -> int:
    """The number of distinct parameters (tied weights counted once), trainable or not.

    Example:
        >>> parameter_count(torch.nn.Linear(4, 2))
        10
    """
    return sum(parameter.numel() for parameter in model.parameters())


def safetensors_size(directory: str | os.PathLike) -> int:
    """Bytes on disk of the ``*.safetensors`` files of a saved checkpoint (all shards).

    Args:
        directory: a ``save_pretrained`` folder.

    Returns:
        The total size in bytes.

    Raises:
        FileNotFoundError: the folder holds no ``.safetensors`` file.
    """
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No .safetensors file in '{directory}': is it a save_pretrained folder?")
    return sum(file.stat().st_size for file in files)


# --------------------------------------------------------------------------------------------------------------------
# Before / after table
# --------------------------------------------------------------------------------------------------------------------


def _bytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def comparison_table(
    original: nn.Module,
    compressed: nn.Module,
    *,
    metrics: Mapping[str, tuple[float, float]] | None = None,
    speeds: list[dict] = (),
    flops: tuple[int, int] | None = None,
    flops_shape: str = "",
    directories: tuple[str | os.PathLike, str | os.PathLike] | None = None,
) -> str:
    """A Markdown before/after table: parameters, metrics, timings, FLOPs and checkpoint size.

    Args:
        original: the reference model.
        compressed: the compressed model.
        metrics: ``{label: (before, after)}``; values in [0, 1] (accuracies) are shown as percentages and their
            change in points.
        speeds: `compare_speed` results, one row each (labelled by their batch shape).
        flops: ``(original, compressed)`` FLOP counts from `count_flops`.
        flops_shape: the batch the FLOPs were counted on, for the label (e.g. ``"batch 32 x 64"``).
        directories: ``(original, compressed)`` checkpoint folders, for their ``.safetensors`` sizes.

    Returns:
        The table, one row per line.

    Example:
        >>> print(comparison_table(model, small, metrics={"test accuracy": (0.80, 0.79)}))  # doctest: +SKIP
        | | original | compressed | change |
        |---|---:|---:|---:|
        | parameters | <original count> | <compressed count> | <change in %> |
        | test accuracy | 80.00% | 79.00% | -1.00 pt |
    """
    before, after = parameter_count(original), parameter_count(compressed)
    rows = [("parameters", f"{before:,}", f"{after:,}", f"{after / before - 1:+.1%}")]
    for label, (value_before, value_after) in (metrics or {}).items():
        if 0 <= value_before <= 1 and 0 <= value_after <= 1:
            rows.append((label, f"{value_before:.2%}", f"{value_after:.2%}",
                         f"{(value_after - value_before) * 100:+.2f} pt"))
        else:
            rows.append((label, f"{value_before:.4g}", f"{value_after:.4g}", f"{value_after - value_before:+.4g}"))
    for result in speeds:
        shape = f"batch {result['batch_size']}" + (f" x {result['seq_len']}" if result["seq_len"] else "")
        rows.append((
            f"forward time, {shape} (median of {result['runs']})",
            f"{result['original_s'] * 1e3:.1f} ms",
            f"{result['compressed_s'] * 1e3:.1f} ms",
            f"speed-up x{result['speedup']:.2f} (paired x{result['paired_speedup']:.2f}, "
            f"CPU time x{result['cpu_speedup']:.2f})",
        ))
    if flops is not None:
        label = "forward FLOPs" + (f", {flops_shape}" if flops_shape else "")
        rows.append((label, f"{flops[0] / 1e9:.2f} G", f"{flops[1] / 1e9:.2f} G",
                     f"ratio x{flops[0] / flops[1]:.2f} (speed-up ceiling)"))
    if directories is not None:
        sizes = [safetensors_size(directory) for directory in directories]
        change = f"{sizes[1] / sizes[0] - 1:+.1%}"
        rows.append(("safetensors on disk", _bytes(sizes[0]), _bytes(sizes[1]), change))
    lines = ["| | original | compressed | change |", "|---|---:|---:|---:|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)
