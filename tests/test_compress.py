"""Sites, calibration, planning and the one-shot `compress`, table-driven over the architectures we ship roles for."""

import pytest
import torch
from tiny_models import ARCHS, TEXT_ARCHS, tiny_inputs, tiny_model
from transformers import AutoConfig, BertConfig, BertModel

import hf_rmtkd
from hf_rmtkd.architectures import find_sites
from hf_rmtkd.calibration import collect_statistics
from hf_rmtkd.spectrum import NonFiniteActivationError

EXPECTED_ROLES = {
    "bert": {"embedding", "attention_in", "attention_out", "ffn_in", "ffn_inner"},
    "roberta": {"embedding", "attention_in", "attention_out", "ffn_in", "ffn_inner"},
    "distilbert": {"embedding", "attention_in", "attention_out", "ffn_in", "ffn_inner"},
    "vit": {"attention_in", "attention_out", "ffn_in", "ffn_inner"},
    "resnet": {"conv_inner"},
    "llama": {"attention_in", "attention_out", "ffn_in", "ffn_inner"},  # embedding too; tied ones are skipped
}


def calibration_batches(arch, n=6):
    return [tiny_inputs(arch, batch=8, seq_len=12, seed=s) for s in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_role_table_finds_every_site_kind(arch):
    model = tiny_model(arch)
    sites = find_sites(model)
    assert EXPECTED_ROLES[arch] <= {s.role for s in sites}
    modules = dict(model.named_modules())
    for site in sites:
        assert site.hook in modules and all(c in modules for c in site.consumers + site.producers)
    layers = [s.layer for s in sites]
    assert layers == sorted(layers)  # shallow to deep


@pytest.mark.parametrize("arch", ARCHS)
def test_compress_cuts_and_reloads(arch, tmp_path):
    model = tiny_model(arch)
    batches = calibration_batches(arch)
    small = hf_rmtkd.compress(model, batches, min_rank=2, progress=False)
    assert small.config.model_type == "rmtkd"
    assert small.rmtkd_plan.cuts, small.rmtkd_plan.skipped
    assert model.num_parameters() - small.num_parameters() == small.rmtkd_plan.params_saved
    for cut in small.rmtkd_plan.cuts:  # Linears reading one input keep the first one's projection
        if len(cut.modules) > 1 and cut.kind == "low_rank":
            holder, *readers = cut.modules
            assert cut.shared_projection and "shares_projection_with" not in small.config.reductions[holder]
            assert all(small.config.reductions[r]["shares_projection_with"] == holder for r in readers)
    assert model.config.model_type == arch and not hasattr(model, "rmtkd_plan")  # the original is untouched
    small.save_pretrained(tmp_path)
    reloaded = type(small).from_pretrained(tmp_path).eval()
    inputs = tiny_inputs(arch, seed=99)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, small.eval()(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_compress_with_a_head_fraction_drops_heads_and_reloads(tmp_path):
    model = tiny_model("bert")
    small = hf_rmtkd.compress(model, calibration_batches("bert"), min_rank=2, head_signal_fraction=0.3,
                              progress=False)
    heads = {path: e for path, e in small.config.reductions.items() if e["kind"] == "attention_heads"}
    assert heads and all(len(e["heads"]) < model.config.num_attention_heads for e in heads.values())
    small.save_pretrained(tmp_path)
    reloaded = type(small).from_pretrained(tmp_path).eval()
    inputs = tiny_inputs("bert", seed=99)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, small.eval()(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_planner_skips_cuts_that_save_nothing():
    model = tiny_model("bert")
    small = hf_rmtkd.compress(model, calibration_batches("bert"), min_rank=30, progress=False)
    # rank 30 of d = 32 cannot pay for a low-rank factorisation of a 32x32 layer
    assert any("would not save" in reason for reason in small.rmtkd_plan.skipped.values())
    for cut in small.rmtkd_plan.cuts:
        assert cut.params_after < cut.params_before


def test_full_rank_compress_is_exact():
    model = tiny_model("bert")
    small = hf_rmtkd.compress(model, calibration_batches("bert"), kinds=["ffn_width"], min_rank=63,
                              progress=False)
    # width 63 of 64 keeps all but one neuron; the refit makes the output nearly identical
    inputs = tiny_inputs("bert", seed=5)
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, model(**inputs).logits, atol=2e-3, rtol=1e-2)


def test_targets_restrict_and_unknown_targets_are_named():
    model = tiny_model("bert")
    small = hf_rmtkd.compress(model, calibration_batches("bert"), targets=["ffn_inner"], min_rank=2, progress=False)
    assert {c.role for c in small.rmtkd_plan.cuts} == {"ffn_inner"}
    with pytest.raises(ValueError, match="no_such_layer"):
        hf_rmtkd.compress(model, calibration_batches("bert"), targets=["no_such_layer"], progress=False)


def test_padding_is_masked():
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32)).eval()
    ids = torch.randint(5, 50, (4, 10))
    mask = torch.zeros(4, 10, dtype=torch.long)
    mask[:, :6] = 1
    sites = find_sites(model, ["ffn_inner"])
    padded = collect_statistics(model, [{"input_ids": ids, "attention_mask": mask}], sites, progress=False)
    short = collect_statistics(model, [{"input_ids": ids[:, :6], "attention_mask": mask[:, :6]}], sites,
                               progress=False)
    name = sites[0].name
    assert padded.accumulators[name].count == 24
    torch.testing.assert_close(padded.accumulators[name].covariance(), short.accumulators[name].covariance(),
                               atol=1e-5, rtol=1e-4)


def test_non_finite_activation_names_the_site():
    model = tiny_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"layer\.0\."):
        hf_rmtkd.analyze(model, calibration_batches("bert", 1), progress=False)


def test_model_without_sites_raises():
    model = torch.nn.Sequential(torch.nn.ReLU())
    with pytest.raises(ValueError, match="no site"):
        hf_rmtkd.analyze(model, [{"input": torch.randn(2, 3)}], progress=False)


def test_empty_calibration_data_raises():
    with pytest.raises(ValueError, match="No calibration data reached"):
        hf_rmtkd.analyze(tiny_model("bert"), [], progress=False)


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_analyze_report_covers_sites(arch):
    report = hf_rmtkd.analyze(tiny_model(arch), calibration_batches(arch), progress=False)
    assert len(report) == len(find_sites(tiny_model(arch)))
    for site in report:
        assert 0 <= site.k <= site.d and site.n > 0


def test_config_of_compressed_model_is_rmtkd():
    small = hf_rmtkd.compress(tiny_model("bert"), calibration_batches("bert"), min_rank=2, progress=False)
    assert isinstance(AutoConfig.for_model("rmtkd"), hf_rmtkd.RMTKDConfig)
    assert set(small.config.reductions) == {p for c in small.rmtkd_plan.cuts for p in c.modules}
    assert small.config.spectral_summary


def test_plan_stops_adding_cuts_once_the_savings_are_reached():
    from hf_rmtkd.calibration import calibrate
    from hf_rmtkd.plan import plan_reductions

    model = tiny_model("bert").eval()
    measurements = calibrate(model, [tiny_inputs("bert", batch=8, seq_len=16, seed=s) for s in range(4)],
                             progress=False)
    every = plan_reductions(measurements, model, min_rank=2)
    assert len(every.cuts) > 2
    needed = every.cuts[0].saved + 1  # more than the first cut saves, less than the first two
    capped = plan_reductions(measurements, model, min_rank=2, max_savings=needed)
    assert [c.site for c in capped.cuts] == [c.site for c in every.cuts[:2]]
