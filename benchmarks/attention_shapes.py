"""Would a narrower attention close the text benchmark's speed and memory gaps? What-if shapes of the RMT-KD model.

On MiniLM-L6 the RMT-KD model's batch-32 speed-up reaches about three quarters of its FLOP ratio (the ceiling):
attention is a quarter of its time (`speed_breakdown.py`) and keeps every kept head's 32 features. Its peak memory
falls less than its parameters, and with the ``residual`` kind the largest tensors alive at the peak are the full
q/k/v projections (`memory_probe.py`). The changes below, which a new reduction kind or a deployed form could make,
were candidates to close these gaps; this script measures them before anyone builds them:

- ``query_key_<r>``: each kept head's queries and keys narrowed from 32 to r features (values keep 32), what a per-head
  low-rank cut of the score matrix QKᵀ would give. It removes FLOPs from q/k and from QKᵀ, but not the softmax; and
  torch's CPU flash-attention kernel needs queries and values of one size, so attention falls back to its math path.
- ``head_size_<r>``: queries, keys and values all narrowed to r features per head, and the output projection reading
  them (a per-head cut of the value path too): the flash kernel runs, on heads of r features.
- ``fused_qkv`` (when q/k/v share one projection P x): q, k and v computed by one product instead of three (the same
  function: the script checks the logits match).
- ``folded_embeddings`` (with the ``residual`` kind, whose stream starts at the embeddings' LayerNorm): the embeddings
  summed and normalised straight into the first segment's coordinates, with no d-wide tensor
  (`hf_rmtkd.fold_embeddings`, built after this measured it; the same function, checked on the logits). Narrowing
  the heads moves the residual row's peak to that d-wide sum, so ``folded_embeddings_head_size_<r>`` combines the two.

Speed is timed against the teacher, alternating in one process, eager, the median of ``--repeats`` comparisons with
the variants interleaved. The share of the FLOP ceiling is the speed-up ÷ the variant's own FLOP ratio, so a change
that removes FLOPs which cost little time lowers it even when the model gets faster. Memory is the live tensor bytes
at batch 32 and at batch 1 (weights plus the forward pass's own peak, `memory_probe.live_tensor_peak_bytes`) against
the teacher's, and where the batch-32 activations peak, with the largest tensors held then
(`memory_probe.tensors_at_peak`). Folding the embeddings changes the time by a few percent, less than the spread
between comparisons with the teacher, so the row as is and its folded form are also timed against each other.
Weights are fresh (speed and memory depend on shapes only); the RMT-KD shapes are rebuilt from the row's round log in
``results/minilm_rt.json`` (`shapes.rmtkd_shaped_model`).

Usage (after `python benchmarks/run.py --only minilm_rt`):
    python benchmarks/attention_shapes.py [--runs 30] [--repeats 3] [--threads 2] [--head-widths 16 8] [--row rmtkd]
Writes ``results/attention_shapes.json`` (``results/attention_shapes_<row>.json`` for another row).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from harness import environment
from memory_probe import MB, live_tensor_peak_bytes, tensors_at_peak, weight_bytes
from shapes import rmtkd_shaped_model
from text import FULL, teacher_cache
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.models.bert.modeling_bert import (
    ALL_ATTENTION_FUNCTIONS,
    BertAttention,
    BertSelfAttention,
    eager_attention_forward,
)

from hf_rmtkd import fold_embeddings
from hf_rmtkd.bench import compare_speed, count_flops, example_inputs
from hf_rmtkd.embedding_folding import can_fold_embeddings
from hf_rmtkd.modeling.layers_rmtkd import LowRankLinear
from hf_rmtkd.utils import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def _attend(module: BertSelfAttention, query, key, value, attention_mask, input_shape, **kwargs) -> tuple:
    """BERT's attention on (batch, seq, heads·features) projections, as `BertSelfAttention.forward` runs it."""
    heads = [t.view(*input_shape, -1, t.shape[-1] // module.heads).transpose(1, 2) for t in (query, key, value)]
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)
    output, weights = attention(module, *heads, attention_mask, dropout=0.0, scaling=module.scaling, **kwargs)
    return output.reshape(*input_shape, -1).contiguous(), weights


class NarrowQueryKeyAttention(BertSelfAttention):
    """q, k and v each split into ``self.heads`` heads, so queries and keys may be narrower than values (eval only)."""

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        projections = (self.query(hidden_states), self.key(hidden_states), self.value(hidden_states))
        return _attend(self, *projections, attention_mask, hidden_states.shape[:-1], **kwargs)


class FusedQKVAttention(BertSelfAttention):
    """q, k and v from one product on their shared projection P x (eval only)."""

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        qkv = F.linear(self.query.project(hidden_states), self.qkv_weight, self.qkv_bias)
        return _attend(self, *qkv.chunk(3, dim=-1), attention_mask, hidden_states.shape[:-1], **kwargs)


def with_folded_embeddings(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose embeddings are folded into its narrowed stream (`hf_rmtkd.fold_embeddings`)."""
    return fold_embeddings(copy.deepcopy(model)).eval()


def _attentions(model: nn.Module) -> list[BertSelfAttention]:
    return [module for module in model.modules() if isinstance(module, BertSelfAttention)]


def _head_count(attention: BertSelfAttention) -> int:
    """The heads an attention keeps (its value projection writes ``heads · head size`` features)."""
    return attention.value.out_features // attention.attention_head_size


def _narrowed(layer: nn.Module, heads: int, width: int) -> nn.Module:
    """``layer`` (an ``nn.Linear`` or a `LowRankLinear`) writing ``heads · width`` features (fresh weights)."""
    if isinstance(layer, LowRankLinear):
        layer.up = nn.Linear(layer.rank, heads * width)
        layer.out_features = heads * width
        return layer
    return nn.Linear(layer.in_features, heads * width)


def with_head_size(model: nn.Module, width: int) -> nn.Module:
    """A copy of ``model`` whose every head has ``width`` query, key and value features (fresh weights), so the
    output projection reads ``heads · width``: what a per-head low-rank cut of QKᵀ and of the value path would give."""
    model = copy.deepcopy(model)
    for block in (module for module in model.modules() if isinstance(module, BertAttention)):
        attention = block.self
        heads = _head_count(attention)
        for name in ("query", "key", "value"):
            setattr(attention, name, _narrowed(getattr(attention, name), heads, width))
        attention.attention_head_size = width  # BERT's attention reshapes q, k and v into heads of this size
        block.output.dense = nn.Linear(heads * width, block.output.dense.out_features)
    return model.eval()


def with_query_key_width(model: nn.Module, width: int) -> nn.Module:
    """A copy of ``model`` whose every head has ``width`` query and key features (fresh q/k weights)."""
    model = copy.deepcopy(model)
    for attention in _attentions(model):
        attention.heads = _head_count(attention)
        attention.query = _narrowed(attention.query, attention.heads, width)
        attention.key = _narrowed(attention.key, attention.heads, width)
        attention.__class__ = NarrowQueryKeyAttention
    return model.eval()


def shares_one_projection(attention: BertSelfAttention) -> bool:
    """Whether q/k/v are `LowRankLinear` layers reading the query's projection (what `with_fused_qkv` needs)."""
    layers = (attention.query, attention.key, attention.value)
    return all(isinstance(layer, LowRankLinear) and layer._projector is layers[0] for layer in layers)


def with_fused_qkv(model: nn.Module) -> nn.Module:
    """A copy of ``model`` computing q/k/v in one product (every attention must `shares_one_projection`)."""
    model = copy.deepcopy(model)
    for attention in _attentions(model):
        if not shares_one_projection(attention):
            raise ValueError("fused_qkv needs q/k/v low-rank layers reading the query's projection.")
        layers = (attention.query, attention.key, attention.value)
        attention.heads = _head_count(attention)
        attention.qkv_weight = torch.cat([layer.up.weight for layer in layers]).detach()
        attention.qkv_bias = torch.cat([layer.up.bias for layer in layers]).detach()
        attention.__class__ = FusedQKVAttention
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30, help="timed alternating rounds per comparison")
    parser.add_argument("--repeats", type=int, default=3, help="comparisons per variant (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the text benchmark's 2)")
    parser.add_argument("--head-widths", type=int, nargs="*", default=[16, 8],
                        help="features per head of the narrowed queries and keys (and values, in head_size_<r>)")
    parser.add_argument("--row", default="rmtkd", help="the result row whose shapes are rebuilt (its round log)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    result = json.loads((RESULTS / "minilm_rt.json").read_text())
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_cache(FULL)).eval()
    rmtkd = rmtkd_shaped_model(teacher, result["rows"][options.row]["log"])
    batch = example_inputs(teacher, 32, 64)
    variants = {options.row: rmtkd}
    fused_error = None
    if all(shares_one_projection(attention) for attention in _attentions(rmtkd)):
        variants["fused_qkv"] = with_fused_qkv(rmtkd)
        with torch.inference_mode():
            fused_error = (variants["fused_qkv"](**batch).logits - rmtkd(**batch).logits).abs().max().item()
        assert fused_error < 1e-4, f"fused_qkv changed the logits by {fused_error}"
    for width in options.head_widths:
        variants[f"query_key_{width}"] = with_query_key_width(rmtkd, width)
        variants[f"head_size_{width}"] = with_head_size(rmtkd, width)
    folded_error = None
    if can_fold_embeddings(rmtkd):  # the residual kind: its stream starts narrow, so can its embeddings
        variants["folded_embeddings"] = with_folded_embeddings(rmtkd)
        with torch.inference_mode():
            folded_error = (variants["folded_embeddings"](**batch).logits - rmtkd(**batch).logits).abs().max().item()
        assert folded_error < 1e-4, f"folded_embeddings changed the logits by {folded_error}"
        for width in options.head_widths:
            variants[f"folded_embeddings_head_size_{width}"] = with_folded_embeddings(variants[f"head_size_{width}"])
    single = example_inputs(teacher, 1, 64)

    def live_tensors(model: nn.Module, inputs: dict) -> int:  # weights + the forward pass's own peak (memory_probe)
        with torch.no_grad():
            return weight_bytes(model) + live_tensor_peak_bytes(lambda: model(**inputs))[1]

    teacher_flops, teacher_bytes = count_flops(teacher, batch), live_tensors(teacher, batch)
    teacher_bytes_b1 = live_tensors(teacher, single)
    speedups = {name: [] for name in variants}
    for _ in range(options.repeats):  # variants interleaved, so a slow spell of the host hits each of them
        for name, model in variants.items():
            speedups[name].append(compare_speed(teacher, model, batch, runs=options.runs)["speedup"])
    head_to_head = None
    if "folded_embeddings" in variants:  # the row as is against its folded form: a small difference, timed directly
        head_to_head = {}
        for size, inputs in (("b32", batch), ("b1", single)):
            timings = [compare_speed(rmtkd, variants["folded_embeddings"], inputs, runs=options.runs * 3)
                       for _ in range(options.repeats)]
            head_to_head[size] = {"speedups": [t["speedup"] for t in timings],
                                  "speedup": statistics.median(t["speedup"] for t in timings),
                                  "runs": options.runs * 3}
    rows = {}
    for name, model in variants.items():
        flop_ratio = teacher_flops / count_flops(model, batch)
        speedup = statistics.median(speedups[name])
        held, held_b1 = live_tensors(model, batch), live_tensors(model, single)
        with torch.no_grad():
            activation_peak = tensors_at_peak(model, batch, largest=6)
        params = model.num_parameters()
        rows[name] = {"params": params, "param_ratio": params / teacher.num_parameters(),
                      "flop_ratio": flop_ratio, "speedup": speedup, "share_of_flop_ceiling": speedup / flop_ratio,
                      "speedups": speedups[name], "live_tensor_mb_b32": held / MB,
                      "live_tensor_ratio_b32": held / teacher_bytes,
                      "live_tensor_ratio_b1": held_b1 / teacher_bytes_b1, "activation_peak_b32": activation_peak}
    report = {
        "environment": environment([], script="attention_shapes.py"),
        "row": options.row,
        "input": "random token ids, batch 32 x seq 64, no padding; teacher and each variant alternating, eager",
        "teacher_live_tensor_mb_b32": teacher_bytes / MB,
        "teacher_live_tensor_mb_b1": teacher_bytes_b1 / MB,
        "runs_per_comparison": options.runs,
        "fused_qkv_max_logit_difference": fused_error,
        "folded_embeddings_max_logit_difference": folded_error,
        "folded_embeddings_vs_row": head_to_head,
        "variants": rows,
    }
    output = "attention_shapes" + ("" if options.row == "rmtkd" else f"_{options.row}")
    write_text_atomic(RESULTS / f"{output}.json", json.dumps(report, indent=2))
    for name, row in rows.items():
        print(f"{name:>14}: params {row['params']:,}  FLOP ratio x{row['flop_ratio']:.2f}  "
              f"speed-up x{row['speedup']:.2f}  share {row['share_of_flop_ceiling']:.0%}  "
              f"live tensors b32 x{row['live_tensor_ratio_b32']:.3f}, b1 x{row['live_tensor_ratio_b1']:.3f} "
              f"(params x{row['param_ratio']:.3f})")
    if head_to_head:
        print(f"folded embeddings vs the row as is: x{head_to_head['b32']['speedup']:.3f} at batch 32, "
              f"x{head_to_head['b1']['speedup']:.3f} at batch 1")


if __name__ == "__main__":
    main()
