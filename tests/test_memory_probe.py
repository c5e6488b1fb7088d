"""The peak live tensor memory of ``benchmarks/memory_probe.py``, on models whose peak can be worked out by hand."""

import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_inputs, tiny_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import memory_probe  # noqa: E402

BATCH, D_IN, D_HIDDEN, D_OUT = 64, 100, 300, 50
FLOAT32 = 4


@pytest.mark.parametrize("inplace, held_at_peak", [
    # Out of place, the first Linear's output is still referenced while ReLU writes its own: both are held.
    (False, D_HIDDEN + D_HIDDEN),
    # In place, ReLU allocates nothing; the peak is the hidden activation while the second Linear writes its output.
    (True, D_HIDDEN + D_OUT),
])
def test_peak_of_a_known_forward_pass(inplace, held_at_peak):
    model = nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.ReLU(inplace=inplace), nn.Linear(D_HIDDEN, D_OUT)).eval()
    inputs = torch.randn(BATCH, D_IN)  # allocated before: not counted
    with torch.no_grad():
        output, peak = memory_probe.live_tensor_peak_bytes(lambda: model(inputs))
    assert output.shape == (BATCH, D_OUT)
    assert peak == BATCH * held_at_peak * FLOAT32


@pytest.mark.parametrize("inplace, at, held", [
    # Out of place: ReLU's output is written while the first Linear's is still referenced.
    (False, "1 relu", [(D_HIDDEN, "0 addmm"), (D_HIDDEN, "1 relu")]),
    # In place, ReLU returns its input's storage (nothing new): the peak is the second Linear writing its output.
    (True, "2 addmm", [(D_HIDDEN, "0 addmm"), (D_OUT, "2 addmm")]),
])
def test_what_is_held_at_the_peak_of_a_known_forward_pass(inplace, at, held):
    model = nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.ReLU(inplace=inplace), nn.Linear(D_HIDDEN, D_OUT)).eval()
    inputs = torch.randn(BATCH, D_IN)
    with torch.no_grad():
        expected = model(inputs)
    peak = memory_probe.tensors_at_peak(_KeywordInput(model), {"x": inputs})
    assert peak["at"] == f"model.{at}"
    assert peak["held"] == [[BATCH * width * FLOAT32 / memory_probe.MB, f"model.{where}"] for width, where in held]
    assert peak["peak_mb"] == pytest.approx(sum(mb for mb, _ in peak["held"]))
    with torch.no_grad():  # the module hooks are gone and changed nothing
        assert torch.equal(model(inputs), expected)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


class _KeywordInput(nn.Module):
    """``model`` called with a keyword batch, as the probe calls transformers models."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def test_freed_memory_does_not_count_twice():
    def two_temporaries_one_after_the_other():
        first = torch.ones(1000)
        del first
        second = torch.ones(1000)
        return second

    _, peak = memory_probe.live_tensor_peak_bytes(two_temporaries_one_after_the_other)
    assert peak == 1000 * FLOAT32


def test_checkpoint_peak_is_weights_plus_forward(tmp_path):
    model = tiny_model("bert")
    model.save_pretrained(tmp_path)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    peak = memory_probe.tensor_peak_mb(tmp_path, tiny_inputs("bert"))
    assert peak["weights"] * memory_probe.MB == weights
    assert peak["forward_above_weights"] > 0
    assert peak["peak"] == pytest.approx(max(peak["load"], peak["weights"] + peak["forward_above_weights"]))
    assert peak == memory_probe.tensor_peak_mb(tmp_path, tiny_inputs("bert"))  # deterministic, unlike RSS
