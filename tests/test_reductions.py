"""The reduction kinds: exactness at full size, parameter counts, errors, and select-vs-fold on a real GELU FFN."""

import copy

import pytest
import torch
from tiny_models import ARCHS, ffn_sites, module_io, module_output, site_statistics, tiny_inputs, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_rmtkd.modeling import LowRankConv2d, LowRankEmbedding, LowRankLinear
from hf_rmtkd.reductions import (
    REDUCTIONS,
    apply_embedding,
    apply_ffn_width,
    apply_low_rank,
    low_rank_parameters,
    low_rank_pays,
    parameter_savings,
    select_neurons,
)
from hf_rmtkd.utils import count_parameters

# One site of each kind per architecture, relative to the default-head tiny model (None: no such site).
SITES = {
    "bert": {"low_rank": "bert.encoder.layer.0.attention.self.query", "embedding": "bert.embeddings.word_embeddings"},
    "roberta": {"low_rank": "roberta.encoder.layer.1.output.dense", "embedding": "roberta.embeddings.word_embeddings"},
    "distilbert": {
        "low_rank": "distilbert.transformer.layer.0.ffn.lin1",
        "embedding": "distilbert.embeddings.word_embeddings",
    },
    "vit": {"low_rank": "vit.layers.0.attention.v_proj", "embedding": None},
    "resnet": {"low_rank": "resnet.encoder.stages.0.layers.0.layer.1.convolution", "embedding": None},
    "llama": {"low_rank": "model.layers.0.self_attn.q_proj", "embedding": "model.embed_tokens"},
}


def relative_mse(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean squared error over the variance of the exact output (0: perfect; 1: no better than its mean)."""
    exact = exact.detach().reshape(-1, exact.shape[-1]).double()
    approx = approx.detach().reshape(-1, approx.shape[-1]).double()
    return float((approx - exact).pow(2).mean() / (exact - exact.mean(0)).pow(2).mean())


def orthonormal_rows(k: int, d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:, :k].T.contiguous()  # (k, d)


def site_entry(model, arch: str, kind: str, keep: float) -> tuple[str, dict]:
    """(path, map entry) of ``kind`` on ``arch`` keeping a fraction ``keep`` of the site's dimension."""
    if kind == "ffn_width":
        path, producers = ffn_sites(arch)[0]
        module = model.get_submodule(path)
        d = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
        return path, {"kind": kind, "width": max(1, int(d * keep)), "producers": producers}
    path = SITES[arch][kind]
    module = model.get_submodule(path)
    if kind == "embedding":
        d = module.embedding_dim
    else:
        d = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
    return path, {"kind": kind, "rank": max(1, int(d * keep))}


def reduce_site(model, inputs, arch: str, kind: str, keep: float) -> tuple[str, dict]:
    """Apply one reduction through the registry's uniform entry point, from the site's measured statistics."""
    path, entry = site_entry(model, arch, kind, keep)
    REDUCTIONS[kind].apply(model, path, entry, **site_statistics(model, path, inputs, kind))
    return path, entry


CASES = [
    pytest.param(arch, kind, id=f"{kind}-{arch}")
    for arch in ARCHS
    for kind in ("low_rank", "embedding", "ffn_width")
    if kind == "ffn_width" or SITES[arch][kind] is not None
]


@pytest.mark.parametrize("arch,kind", CASES)
def test_full_size_reduction_reproduces_the_model(arch, kind):
    model, inputs = tiny_model(arch), tiny_inputs(arch, batch=16)
    before = model(**inputs).logits
    reduce_site(model, inputs, arch, kind, keep=1.0)
    torch.testing.assert_close(model(**inputs).logits, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,kind", CASES)
def test_reduction_removes_exactly_the_predicted_parameters(arch, kind):
    model, inputs = tiny_model(arch), tiny_inputs(arch, batch=16)
    total = model.num_parameters()
    path, entry = site_entry(model, arch, kind, keep=0.25)
    predicted = REDUCTIONS[kind].parameter_savings(model, path, entry)
    REDUCTIONS[kind].apply(model, path, entry, **site_statistics(model, path, inputs, kind))
    assert predicted > 0
    assert model.num_parameters() == total - predicted
    assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("layer", ["linear", "conv1d", "conv2d"])
def test_low_rank_full_rank_with_orthonormal_projection_is_exact(layer):
    torch.manual_seed(0)
    d_in, d_out = 12, 7
    module = {"linear": nn.Linear(d_in, d_out), "conv1d": Conv1D(d_out, d_in), "conv2d": nn.Conv2d(d_in, d_out, 3)}[
        layer
    ]
    nn.init.normal_(module.weight, std=0.2)  # outputs of order 1, so float32 rounding stays below atol
    model = nn.ModuleDict({"layer": module}).eval()
    x = torch.randn(5, d_in, 6, 6) if layer == "conv2d" else torch.randn(5, 4, d_in)
    before = module(x)
    new = apply_low_rank(model, "layer", orthonormal_rows(d_in, d_in), mean=torch.randn(d_in, dtype=torch.float64))
    assert model["layer"] is new and isinstance(new, LowRankConv2d if layer == "conv2d" else LowRankLinear)
    torch.testing.assert_close(new(x), before, atol=1e-5, rtol=0)


def test_low_rank_is_exact_on_the_kept_subspace_and_costs_k_din_plus_dout_plus_bias():
    torch.manual_seed(0)
    d_in, d_out, k = 16, 10, 4
    model = nn.ModuleDict({"layer": nn.Linear(d_in, d_out)})
    P, mu = orthonormal_rows(k, d_in, seed=1), torch.randn(d_in, dtype=torch.float64)
    x = (mu + torch.randn(32, k, dtype=torch.float64) @ P).float()  # inputs in μ + span(Pᵀ)
    before = model["layer"](x)
    new = apply_low_rank(model, "layer", P, mean=mu)
    torch.testing.assert_close(new(x), before, atol=1e-5, rtol=0)
    assert count_parameters(new) == k * (d_in + d_out) + d_out == low_rank_parameters(d_in, d_out, k)
    assert "in_features=16, out_features=10, rank=4" in repr(new)
    assert low_rank_pays(d_in, d_out, k) and not low_rank_pays(d_in, d_out, 7)


def _attention_cut_with_shared_projection(rank=8, **overrides):
    """A tiny BERT whose first attention's q/k/v are cut through one P held by the query."""
    model, inputs = tiny_model("bert", **overrides), tiny_inputs("bert")
    prefix = "bert.encoder.layer.0.attention.self."
    statistics = site_statistics(model, prefix + "query", inputs)
    projection = statistics["eigenvectors"][:, :rank].T
    for name in ("query", "key", "value"):
        holder = None if name == "query" else prefix + "query"
        apply_low_rank(model, prefix + name, projection, statistics["mean"], shares_projection_with=holder)
    return model.eval(), inputs, prefix


def test_shared_projection_matches_separate_copies_and_runs_p_x_once_per_forward():
    separate, inputs = tiny_model("bert").eval(), tiny_inputs("bert")
    prefix = "bert.encoder.layer.0.attention.self."
    statistics = site_statistics(separate, prefix + "query", inputs)
    for name in ("query", "key", "value"):
        apply_low_rank(separate, prefix + name, statistics["eigenvectors"][:, :8].T, statistics["mean"])
    shared, _, _ = _attention_cut_with_shared_projection()
    holder = shared.get_submodule(prefix + "query")
    calls = []
    holder.down.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        torch.testing.assert_close(shared(**inputs).logits, separate(**inputs).logits, atol=1e-5, rtol=0)
        assert len(calls) == 1 and holder._memo is None  # one product, handed to key and value, then dropped
        other = {**inputs, "input_ids": inputs["input_ids"].flip(0)}  # a new input gets a new product
        torch.testing.assert_close(shared(**other).logits, separate(**other).logits, atol=1e-5, rtol=0)
    assert len(calls) == 2
    # One P for three layers: 2·k·d fewer parameters than separate copies.
    assert separate.num_parameters() - shared.num_parameters() == 2 * 8 * 32
    assert "down" not in dict(shared.get_submodule(prefix + "key").named_children())
    shared.get_submodule(prefix + "key").read_projection_of(holder)  # linking twice counts one reader
    assert holder._readers == 3


def test_shared_projection_trains_p_from_every_reader_and_survives_deepcopy():
    model, inputs, prefix = _attention_cut_with_shared_projection()
    model.train()
    model(**inputs).logits.sum().backward()
    holder = model.get_submodule(prefix + "query")
    assert holder.down.weight.grad is not None and holder.down.weight.grad.abs().sum() > 0
    holder._memo = (inputs["input_ids"], True, model(**inputs).logits, 1)  # a product left pending (non-leaf)
    twin = copy.deepcopy(model).eval()
    assert twin.get_submodule(prefix + "key")._projector is twin.get_submodule(prefix + "query")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("reentrant", [False, True])
def test_shared_projection_gradients_are_the_same_under_gradient_checkpointing(reentrant):
    # Checkpointing runs each layer's forward again during backward: the recomputation must not reuse a stale P x.
    model, inputs, _ = _attention_cut_with_shared_projection(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    labels = torch.tensor([0, 1, 0, 1])

    def gradients(checkpointing):
        twin = copy.deepcopy(model).train()
        if checkpointing:
            twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        twin(**inputs, labels=labels).loss.backward()
        return {name: p.grad for name, p in twin.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_shared_projection_errors_name_the_layers():
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    prefix = "bert.encoder.layer.0.attention.self."
    statistics = site_statistics(model, prefix + "query", inputs)
    P = statistics["eigenvectors"][:, :8].T
    with pytest.raises(ValueError, match="query.*does not hold this projection"):  # the holder was never cut
        apply_low_rank(model, prefix + "key", P, shares_projection_with=prefix + "query")
    apply_low_rank(model, prefix + "query", P)
    with pytest.raises(ValueError, match="does not hold this projection"):  # another P than the holder's
        other = statistics["eigenvectors"][:, 1:9].T
        apply_low_rank(model, prefix + "key", other, shares_projection_with=prefix + "query")
    unlinked = LowRankLinear(32, 32, 8, shares_projection=True)
    with pytest.raises(RuntimeError, match="never linked"):
        unlinked(torch.randn(2, 32))
    with pytest.raises(ValueError, match="rank 4"):
        LowRankLinear(32, 32, 4, shares_projection=True).read_projection_of(model.get_submodule(prefix + "query"))


def test_parameter_savings_is_not_positive_when_low_rank_does_not_pay():
    model = tiny_model("bert")
    path = "bert.encoder.layer.0.attention.self.query"  # 32 x 32 (+32 bias): rank 16 costs 16 * 64 (+32 bias)
    assert parameter_savings(model, path, {"kind": "low_rank", "rank": 16}) == 0
    assert parameter_savings(model, path, {"kind": "low_rank", "rank": 17}) < 0
    assert parameter_savings(model, path, {"kind": "low_rank", "rank": 8}) == 32 * 32 - 8 * 64


def test_embedding_full_rank_is_exact_and_keeps_the_embedding_interface():
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    path = "bert.embeddings.word_embeddings"
    before = model(**inputs).logits
    mean = site_statistics(model, path, inputs, "embedding")["mean"]
    new = apply_embedding(model, path, orthonormal_rows(32, 32), mean)
    assert isinstance(new, LowRankEmbedding) and model.get_input_embeddings() is new
    assert (new.num_embeddings, new.embedding_dim, new.padding_idx) == (128, 32, model.config.pad_token_id)
    torch.testing.assert_close(model(**inputs).logits, before, atol=1e-5, rtol=0)


def test_embedding_tied_to_the_lm_head_is_refused_by_name():
    model = tiny_model("bert", "masked_lm")  # BERT ties the MLM decoder to the word embeddings
    with pytest.raises(ValueError, match="bert.embeddings.word_embeddings.*tied"):
        apply_embedding(model, "bert.embeddings.word_embeddings", orthonormal_rows(8, 32))


def test_select_neurons_returns_width_distinct_sorted_indices():
    model, inputs = tiny_model("llama"), tiny_inputs("llama", batch=16)
    stats = site_statistics(model, "model.layers.0.mlp.down_proj", inputs)
    keep = select_neurons(stats["eigenvectors"], stats["eigenvalues"], 20)
    assert keep.shape == (20,) and torch.equal(keep, keep.unique()) and int(keep.max()) < 64


def test_select_at_half_width_beats_fold_on_a_gelu_ffn():
    """The paper's rotation folded through GELU vs keeping whole neurons and refitting the down-projection.

    initializer_range=0.2 puts the GELU pre-activations in its curved range (at 0.02 BERT's FFN is nearly linear).
    """
    inputs = tiny_inputs("bert", batch=32, seq_len=16)
    consumer, producers = ffn_sites("bert")[0]
    errors = {}
    for method in ("fold", "select"):
        model = tiny_model("bert", initializer_range=0.2)
        exact_ffn, exact_logits = module_output(model, consumer, inputs), model(**inputs).logits
        apply_ffn_width(
            model, consumer, producers, width=32, method=method, **site_statistics(model, consumer, inputs)
        )
        errors[method] = (
            relative_mse(module_output(model, consumer, inputs), exact_ffn),
            relative_mse(model(**inputs).logits, exact_logits),
        )
    print(
        "\nffn_width, tiny BERT layer 0 (GELU, d_ff 64 -> 32), relative MSE on calibration data [FFN output, logits]: "
        f"fold [{errors['fold'][0]:.4f}, {errors['fold'][1]:.4f}], "
        f"select [{errors['select'][0]:.4f}, {errors['select'][1]:.4f}]"
    )
    assert errors["select"][0] < errors["fold"][0] and errors["select"][1] < errors["fold"][1]


def test_conv_refit_beats_plain_channel_slicing_on_a_3x3_consumer():
    """ResNet bottleneck: refitting the 3x3 consumer from the channel covariance vs slicing its input channels."""
    inputs = tiny_inputs("resnet", batch=32)
    consumer, producers = ffn_sites("resnet")[0]
    model = tiny_model("resnet").train()
    with torch.no_grad():  # give the BatchNorms real running statistics
        for _ in range(3):
            model(**inputs)
    model.eval()
    x, exact = module_io(model, consumer, inputs)
    conv = model.get_submodule(consumer)
    stats = site_statistics(model, consumer, inputs)
    keep = select_neurons(stats["eigenvectors"], stats["eigenvalues"], 4)
    sliced = nn.functional.conv2d(x[:, keep], conv.weight[:, keep], stride=conv.stride, padding=conv.padding)
    apply_ffn_width(model, consumer, producers, width=4, **stats)
    refit = module_output(model, consumer, inputs)
    refit_error = relative_mse(refit.movedim(1, -1), exact.movedim(1, -1))
    slice_error = relative_mse(sliced.movedim(1, -1), exact.movedim(1, -1))
    print(
        "\nResNet 3x3 consumer, 8 -> 4 channels, relative MSE of its output: "
        f"refit {refit_error:.4f}, slice {slice_error:.4f}"
    )
    assert refit_error < slice_error


@pytest.mark.parametrize("arch", ["llama", "resnet"])
def test_fold_refuses_gated_or_normalised_ffns(arch):
    model, inputs = tiny_model(arch), tiny_inputs(arch)
    consumer, producers = ffn_sites(arch)[0]
    with pytest.raises(ValueError, match="fold.*select"):
        apply_ffn_width(model, consumer, producers, width=4, method="fold", **site_statistics(model, consumer, inputs))


@pytest.mark.parametrize("kind", ["low_rank", "embedding", "ffn_width"])
def test_a_missing_module_is_named_in_the_error(kind):
    model = tiny_model("bert")
    entry = {"kind": kind, "rank": 4, "width": 4, "producers": ["bert.encoder.layer.0.intermediate.dense"]}
    for error in (KeyError, ValueError):
        with pytest.raises(error, match="bert.encoder.layer.9.nope"):
            REDUCTIONS[kind].build(model, "bert.encoder.layer.9.nope", entry)


@pytest.mark.parametrize(
    "kind,path",
    [("low_rank", "bert.embeddings.LayerNorm"), ("embedding", "bert.pooler.dense"), ("ffn_width", "bert.pooler")],
)
def test_a_module_of_the_wrong_type_is_named_in_the_error(kind, path):
    model = tiny_model("bert")
    entry = {"kind": kind, "rank": 4, "width": 4, "producers": ["bert.encoder.layer.0.intermediate.dense"]}
    with pytest.raises(ValueError, match=path):
        REDUCTIONS[kind].build(model, path, entry)


def test_surgery_keeps_dtype():
    model, inputs = tiny_model("llama").double(), tiny_inputs("llama", batch=8)
    for kind in ("ffn_width", "low_rank", "embedding"):
        reduce_site(model, inputs, "llama", kind, keep=0.5)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
