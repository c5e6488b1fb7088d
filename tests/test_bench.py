"""`hf_rmtkd.bench`: the structure of speed comparisons, FLOP ratios and size helpers (no timing is asserted)."""

import pytest
import torch
from tiny_models import tiny_inputs, tiny_model
from torch import nn

import hf_rmtkd
from hf_rmtkd.bench import (
    compare_speed,
    comparison_table,
    count_flops,
    cpu_name,
    example_inputs,
    flop_ratio,
    format_speed,
    parameter_count,
    safetensors_size,
)

SPEED_KEYS = {
    "original_s", "compressed_s", "original_iqr_s", "compressed_iqr_s", "speedup", "paired_speedup",
    "original_cpu_s", "compressed_cpu_s", "cpu_speedup", "original_examples_per_s", "compressed_examples_per_s",
    "batch_size", "seq_len", "runs", "warmup", "threads",
    "device", "cpu", "gpu", "torch",
}


def mlp(width: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 32))


def test_compare_speed_reports_medians_ratios_and_conditions():
    model = tiny_model("bert")
    result = compare_speed(model, model, batch_size=4, seq_len=16, runs=12, warmup=2, threads=1)
    assert set(result) == SPEED_KEYS
    assert (result["batch_size"], result["seq_len"], result["runs"], result["threads"]) == (4, 16, 12, 1)
    assert result["device"] == "cpu" and result["gpu"] is None and result["torch"] == torch.__version__
    assert isinstance(result["cpu"], str) and result["cpu"]
    for name in ("original", "compressed"):
        q1, q3 = result[f"{name}_iqr_s"]
        assert 0 < q1 <= result[f"{name}_s"] <= q3
        assert result[f"{name}_examples_per_s"] == pytest.approx(4 / result[f"{name}_s"])
    assert result["speedup"] == pytest.approx(result["original_s"] / result["compressed_s"])
    assert result["speedup"] > 0 and result["paired_speedup"] > 0
    assert "batch 4 x seq 16, 1 threads" in format_speed(result)


def test_compare_speed_restores_threads_and_training_mode():
    model = tiny_model("bert").train()
    before = torch.get_num_threads()
    compare_speed(model, model, batch_size=2, seq_len=8, runs=2, warmup=0, threads=1)
    assert torch.get_num_threads() == before and model.training


def test_compare_speed_accepts_a_batch_a_tensor_or_an_inputs_function():
    net = mlp(64)
    by_tensor = compare_speed(net, net, torch.randn(5, 32), runs=2, warmup=0)
    assert (by_tensor["batch_size"], by_tensor["seq_len"]) == (5, None)
    model = tiny_model("bert")
    by_batch = compare_speed(model, model, tiny_inputs("bert", batch=3, seq_len=7), runs=2, warmup=0)
    assert (by_batch["batch_size"], by_batch["seq_len"]) == (3, 7)
    by_function = compare_speed(model, model, lambda b, n: tiny_inputs("bert", batch=b, seq_len=n),
                                batch_size=2, seq_len=9, runs=2, warmup=0)
    assert (by_function["batch_size"], by_function["seq_len"]) == (2, 9)
    vision = tiny_model("resnet")
    by_config = compare_speed(vision, vision, batch_size=2, runs=1, warmup=0)
    assert (by_config["batch_size"], by_config["seq_len"]) == (2, None)


def test_example_inputs_follow_the_config():
    text = example_inputs(tiny_model("bert"), batch_size=3, seq_len=5)
    assert text["input_ids"].shape == text["attention_mask"].shape == (3, 5)
    assert int(text["input_ids"].max()) < tiny_model("bert").config.vocab_size
    image = example_inputs(tiny_model("vit"), batch_size=2)
    assert image["pixel_values"].shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="vocab_size"):
        example_inputs(mlp(8))


def test_flop_ratio_of_a_model_with_itself_is_exactly_one():
    model = tiny_model("bert")
    assert flop_ratio(model, model, example_inputs(model, 2, 8)) == 1.0


def test_half_width_mlp_does_half_the_flops():
    x = torch.randn(16, 32)
    assert count_flops(mlp(64), x) == 2 * 16 * (32 * 64 + 64 * 32)
    assert flop_ratio(mlp(64), mlp(32), x) == pytest.approx(2.0)


def test_attention_products_are_counted_under_sdpa():
    inputs = example_inputs(tiny_model("bert"), 2, 8)
    # The CPU sdpa kernel is missing from PyTorch's table; bench adds it, so sdpa and eager attention count alike.
    assert count_flops(tiny_model("bert"), inputs) == count_flops(tiny_model("bert", attn_implementation="eager"),
                                                                   inputs)


def test_compressed_model_has_fewer_flops_and_parameters(tmp_path):
    model = tiny_model("bert")
    batches = [tiny_inputs("bert", batch=8, seq_len=12, seed=s) for s in range(6)]
    small = hf_rmtkd.compress(model, batches, min_rank=2, progress=False)
    assert parameter_count(small) < parameter_count(model)
    assert flop_ratio(model, small, example_inputs(small, 2, 12)) > 1
    model.save_pretrained(tmp_path / "original")
    small.save_pretrained(tmp_path / "small")
    assert safetensors_size(tmp_path / "small") < safetensors_size(tmp_path / "original")


def test_size_helpers(tmp_path):
    assert parameter_count(nn.Linear(4, 2)) == 10
    tied = nn.Linear(4, 4)
    pair = nn.Sequential(tied, tied)
    assert parameter_count(pair) == 20  # a shared module counts once
    model = tiny_model("bert")
    model.save_pretrained(tmp_path)
    assert safetensors_size(tmp_path) == (tmp_path / "model.safetensors").stat().st_size
    with pytest.raises(FileNotFoundError, match="safetensors"):
        safetensors_size(tmp_path / "missing")


def test_cpu_name_is_a_name():
    assert isinstance(cpu_name(), str) and cpu_name()


def test_comparison_table_rows(tmp_path):
    model = tiny_model("bert")
    small = hf_rmtkd.compress(model, [tiny_inputs("bert", batch=8, seq_len=12, seed=s) for s in range(6)],
                              min_rank=2, progress=False)
    speed = compare_speed(model, small, batch_size=2, seq_len=8, runs=2, warmup=0)
    batch = example_inputs(model, 2, 8)
    model.save_pretrained(tmp_path / "original")
    small.save_pretrained(tmp_path / "small")
    table = comparison_table(model, small, metrics={"accuracy": (0.9, 0.885), "loss": (1.5, 1.75)}, speeds=[speed],
                             flops=(count_flops(model, batch), count_flops(small, batch)), flops_shape="batch 2 x 8",
                             directories=(tmp_path / "original", tmp_path / "small")).splitlines()
    assert table[0] == "| | original | compressed | change |" and len(table) == 2 + 6
    assert table[2].startswith(f"| parameters | {parameter_count(model):,} | {parameter_count(small):,} | -")
    assert table[3] == "| accuracy | 90.00% | 88.50% | -1.50 pt |"
    assert table[4] == "| loss | 1.5 | 1.75 | +0.25 |"
    assert table[5].startswith("| forward time, batch 2 x 8 (median of 2) |")
    assert "speed-up ceiling" in table[6] and table[7].startswith("| safetensors on disk |")
