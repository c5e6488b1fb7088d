"""Smoke tests of the benchmark machinery (``benchmarks/``) on tiny random models: sizes, runnable models, reports."""

import copy
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tiny_models import tiny_inputs, tiny_model, tiny_tokenizer
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    TrainingArguments,
)

from hf_rmtkd import RMTKDTrainingArguments
from hf_rmtkd.architectures import find_sites
from hf_rmtkd.bench import parameter_count
from hf_rmtkd.calibration import collect_statistics, measure_sites
from hf_rmtkd.plan import DEFAULT_KINDS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import attention_shapes  # noqa: E402
import baselines  # noqa: E402
import distillation_sweep  # noqa: E402
import head_fraction_speed  # noqa: E402
import measure  # noqa: E402
import report  # noqa: E402
import speed_breakdown  # noqa: E402

KINDS = ["ffn_width", "low_rank", "embedding"]


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert")


@pytest.fixture(scope="module")
def bert_measurements(bert):
    sites = find_sites(bert)
    data = [tiny_inputs("bert", seed=seed) for seed in range(4)]
    return measure_sites(collect_statistics(bert, data, sites, progress=False), sites)


def _runs(model, arch="bert"):
    with torch.no_grad():
        logits = model(**tiny_inputs(arch)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("rank", [4, 12])
def test_svd_uniform_has_the_parameters_it_claims(bert, rank):
    model = baselines.svd_uniform(bert, rank)
    assert parameter_count(model) == baselines.svd_uniform_params(bert, rank) < parameter_count(bert)
    _runs(model)


def test_svd_at_full_rank_is_exact_on_the_encoder(bert):
    # At rank d_in no Linear pays to factor, and the embedding at rank d is its own exact factorisation.
    model = baselines.svd_uniform(bert, 32)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, bert(**inputs).logits, atol=1e-4, rtol=1e-4)


AUTO_CLASSES = {"bert": AutoModelForSequenceClassification, "resnet": AutoModelForImageClassification}
LAYER_DROPS = {  # arch: (teacher overrides, blocks kept per stack, factored to a matched size by)
    "bert": ({}, [1], lambda model: baselines.svd_uniform(model, 6)),
    "resnet": ({"depths": [2, 3]}, [1, 2], lambda model: baselines.svd_rank_ratio(model, 0.5)),
}


@pytest.mark.parametrize("arch", sorted(LAYER_DROPS))
def test_layer_drop_keeps_every_other_block_then_factors_and_reloads(arch, tmp_path):
    overrides, kept, factor = LAYER_DROPS[arch]
    teacher = tiny_model(arch, **overrides)
    dropped = baselines.layer_drop(teacher)
    if arch == "bert":
        assert len(dropped.bert.encoder.layer) == dropped.config.num_hidden_layers == kept[0]
        assert torch.equal(dropped.bert.encoder.layer[0].output.dense.weight,
                           teacher.bert.encoder.layer[0].output.dense.weight)
    else:  # block 0 of each stage (width and stride change) always stays; block 2 of stage 1 is now block 1
        assert [len(stage.layers) for stage in dropped.resnet.encoder.stages] == dropped.config.depths == kept
        assert torch.equal(dropped.resnet.encoder.stages[1].layers[1].layer[0].convolution.weight,
                           teacher.resnet.encoder.stages[1].layers[2].layer[0].convolution.weight)
    assert parameter_count(dropped) < parameter_count(teacher)
    model = factor(dropped)
    assert parameter_count(model) < parameter_count(dropped)
    _runs(model, arch)
    model.save_pretrained(tmp_path)  # reloads at its own depth: the saved config carries it
    reloaded = AUTO_CLASSES[arch].from_pretrained(tmp_path)
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("threshold", [0.5, 0.95])
def test_pca_energy_has_the_parameters_it_claims(bert, bert_measurements, threshold):
    model = baselines.pca_energy(bert, bert_measurements, threshold, kinds=KINDS, min_rank=2)
    claimed = baselines.pca_energy_params(bert, bert_measurements, threshold, kinds=KINDS, min_rank=2)
    assert parameter_count(model) == claimed
    _runs(model)


def test_energy_rank():
    eigenvalues = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    assert baselines.energy_rank(eigenvalues, 0.4) == 1
    assert baselines.energy_rank(eigenvalues, 0.7) == 2
    assert baselines.energy_rank(eigenvalues, 1.0) == 4


def test_match_parameter_lands_within_three_percent(bert):
    target = baselines.svd_uniform_params(bert, 9) + 50
    rank = baselines.match_parameter(lambda r: baselines.svd_uniform_params(bert, int(r)), target, 1, 32,
                                     integer=True)
    assert abs(baselines.svd_uniform_params(bert, int(rank)) / target - 1) <= 0.03


def test_conv_svd_and_no_distillation_rounds_run():
    resnet = tiny_model("resnet")
    model = baselines.svd_rank_ratio(resnet, 0.25)
    assert parameter_count(model) == baselines.svd_rank_ratio_params(resnet, 0.25) < parameter_count(resnet)
    _runs(model, "resnet")
    data = [tiny_inputs("resnet", seed=seed) for seed in range(2)]
    rounds = [{"spectrum_quantile": 0.5}, {"spectrum_quantile": 0.5, "signal_fraction": 0.8}]
    cut = baselines.rmtkd_without_distillation(resnet, data, rounds=rounds, sites_per_round=1, kinds=KINDS,
                                             min_rank=2)
    assert parameter_count(cut) < parameter_count(resnet)
    _runs(cut, "resnet")


@pytest.mark.parametrize("loss", [None, {"distillation_mask_prob": 0.5}, {"distillation_mixup": 0.4}])
def test_distil_trains_the_student_only(bert, tmp_path, loss):
    teacher = copy.deepcopy(bert)
    student = baselines.svd_uniform(bert, 6)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    rows = {k: v.tolist() for k, v in tiny_inputs("bert", batch=8).items()}
    train = Dataset.from_dict({**rows, "labels": [0, 1, 2, 0, 1, 2, 0, 1]})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], disable_tqdm=True, use_cpu=True)
    collator = DataCollatorWithPadding(tiny_tokenizer(tmp_path))  # the masked copy takes its [MASK] from here
    baselines.distil(student, teacher, train, steps=2, args=args, data_collator=collator, loss=loss)
    assert any(not torch.equal(before[name], p) for name, p in student.named_parameters())
    for (_, p), (_, q) in zip(teacher.named_parameters(), bert.named_parameters(), strict=True):
        assert torch.equal(p, q)


def test_export_sizes_record_the_folded_form_and_leave_the_model_alone():
    import harness

    import hf_rmtkd

    resnet = tiny_model("resnet")
    before = copy.deepcopy(resnet.state_dict())
    sizes = harness.export_sizes(resnet, hf_rmtkd.fold_batchnorm)
    # Folding drops each norm's weight (its bias becomes the conv's) and every running statistic.
    assert sizes["export_params"] < parameter_count(resnet)
    assert sizes["export_safetensors_bytes"] < measure.checkpoint_bytes(resnet)
    assert all(torch.equal(t, before[k]) for k, t in resnet.state_dict().items())
    assert harness.export_sizes(resnet, None) == {}


def test_measure_row_reports_sizes_and_ratios(bert):
    small = baselines.svd_uniform(bert, 4)
    row = measure.measure_row(bert, small, lambda b, s: tiny_inputs("bert", batch=b, seq_len=s), seq_len=8,
                              runs_b32=1, runs_b1=1, warmup=0)
    assert row["params"] == parameter_count(small)
    assert 0 < row["non_embedding_params"] < row["params"]
    assert row["safetensors_bytes"] > 0 and row["flop_ratio"] > 1
    assert row["throughput_ratio_b32"] > 0 and row["latency_ratio_b1"] > 0
    for batch in (32, 1):  # the inference peaks of both models, each loaded in a fresh process
        assert row[f"inference_peak_mb_b{batch}"] > 0 and row[f"teacher_inference_peak_mb_b{batch}"] > 0
        assert row[f"inference_memory_ratio_b{batch}"] == pytest.approx(
            row[f"inference_peak_mb_b{batch}"] / row[f"teacher_inference_peak_mb_b{batch}"])
        # Warm: the first load's one-off library set-up excluded, so never above the cold peak by much; a tiny
        # model's warm peak may be 0 (its pages fit in memory the process already holds).
        assert 0 <= row[f"warm_inference_peak_mb_b{batch}"] <= row[f"inference_peak_mb_b{batch}"] + 1
        assert 0 <= row[f"teacher_warm_inference_peak_mb_b{batch}"] <= row[f"teacher_inference_peak_mb_b{batch}"] + 1
    assert row["energy_j_per_inference_b1"] == "unavailable" or isinstance(row["energy_j_per_inference_b1"], float)


def _synthetic_result(seeds=(0.80, 0.79)) -> dict:
    def row(accuracy, params, **extra):
        return {"accuracy": accuracy, "params": params, "non_embedding_params": params // 2,
                "safetensors_bytes": params * 4, "throughput_ratio_b32": 2.0, "latency_ratio_b1": 1.5,
                "flop_ratio": 2.2, **extra}

    return {
        "mode": "quick", "wall_seconds": 60,
        "environment": {"cpu": "test CPU", "torch_threads": 2, "load_average_at_start": [1.0, 1.0, 1.0],
                        "versions": {"torch": "x", "transformers": "y"}, "rapl": "unavailable"},
        "data": {"test": 1000, "test_description": "synthetic"},
        "rows": {"teacher": row(0.81, 1000), "rmtkd": row(seeds[0], 400, seed_accuracies=list(seeds)),
                 "svd_uniform": row(0.75, 405, matched=True), "tau_0.3": row(0.80, 600)},
    }


def test_summary_follows_the_schema():
    summary = {"minilm_rt": report.summarize(_synthetic_result())}
    report.validate_summary(summary)
    entry = summary["minilm_rt"]
    assert set(entry["baselines"]) == {"svd_uniform", "tau_0.3"}
    assert entry["rmtkd"]["accuracy"] == pytest.approx(0.795) and entry["rmtkd"]["accuracy_std"] > 0
    assert report.summarize(_synthetic_result(seeds=(0.8,)))["rmtkd"]["accuracy_std"] is None


@pytest.mark.parametrize("breakage", ["extra key", "percent accuracy", "missing ratio"])
def test_summary_validation_rejects_bad_entries(breakage):
    entry = report.summarize(_synthetic_result())
    if breakage == "extra key":
        entry["teacher"]["loss"] = 0.1
    elif breakage == "percent accuracy":
        entry["rmtkd"]["accuracy"] = 79.5
    else:
        del entry["rmtkd"]["flop_ratio"]
    with pytest.raises(ValueError):
        report.validate_summary({"minilm_rt": entry})


def test_regenerate_writes_summary_plot_and_one_readme_section(tmp_path):
    (tmp_path / "minilm_rt.json").write_text(json.dumps(_synthetic_result()))
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n## Usage\n\ntext\n")
    for _ in range(2):  # regenerating replaces the section instead of appending a second one
        report.regenerate(tmp_path, readme)
    text = readme.read_text()
    assert text.count("## Benchmarks") == 1 and text.startswith("# Title\n\n## Usage\n\ntext\n")
    assert "missed" in text  # the synthetic RMT-KD row misses the 80% cut, and the README says so
    report.validate_summary(json.loads((tmp_path / "summary.json").read_text()))
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert "](benchmarks/results/frontier.png)" in text  # the plot is shown, not only named


def test_paper_scale_result_is_reported_beside_the_benchmarks(tmp_path):
    """`run.py --paper-scale` writes only a teacher and an RMT-KD row: it still gets a summary entry (no baselines),
    a README section that says how to run it, and the text targets' verdicts."""
    paper = _synthetic_result(seeds=(0.80,))
    paper["rows"] = {name: paper["rows"][name] for name in ("teacher", "rmtkd")}
    paper["rows"]["rmtkd"]["params"] = 150  # 85% fewer, at 1 point lost, x2.0 throughput
    (tmp_path / "minilm_rt.json").write_text(json.dumps(_synthetic_result()))
    (tmp_path / "paper_scale.json").write_text(json.dumps(paper))
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    summary = report.regenerate(tmp_path, readme)
    assert set(summary) == {"minilm_rt", "paper_scale"} and summary["paper_scale"]["baselines"] == {}
    section = readme.read_text().split("### `paper_scale`")[1]
    assert "run.py --paper-scale" in section and "RMT-KD over 1 seed(s)" in section
    assert "- met: >= 80% fewer total params — 85.0% fewer" in section
    assert "- **missed**: >= 2.8x batch-32 throughput — x2.00" in section


@pytest.mark.parametrize("majority, measurable", [(0.81, False), (0.805, False), (0.60, True), (None, True)])
def test_no_accuracy_loss_counts_only_against_a_teacher_that_beats_the_commonest_label(majority, measurable):
    result = _synthetic_result(seeds=(0.81,))  # RMT-KD as accurate as the teacher (0.81)
    if majority is not None:
        result["rows"]["teacher"]["majority_class_accuracy"] = majority
    checks = {target: (ok, measured) for target, ok, measured in report.targets("minilm_rt", result)}
    ok, measured = checks["<= 1.0 point accuracy loss"]
    assert ok is measurable
    assert ("not measurable" in measured) is not measurable


def _tiny_teacher(tmp_path, settings, collator=None, max_steps=1):
    """`harness.cached_teacher` on a tiny ResNet, checkpointing every step."""
    from harness import cached_teacher
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic",
                          num_labels=2)
    data = Dataset.from_dict({"pixel_values": torch.randn(8, 1, 8, 8).tolist(), "labels": [0, 1] * 4})
    args = TrainingArguments(output_dir=None, max_steps=max_steps, per_device_train_batch_size=4, save_steps=1,
                             report_to=[], disable_tqdm=True, use_cpu=True)
    return cached_teacher(tmp_path / "cache", settings, ResNetForImageClassification, config, args, train=data,
                          validation=data, collator=collator)


def test_cached_teacher_trains_once_and_again_only_for_other_settings(tmp_path):
    trained, source = _tiny_teacher(tmp_path, {"epochs": 1})
    assert source.startswith("trained now") and not (tmp_path / "cache.checkpoints").exists()
    reused, source = _tiny_teacher(tmp_path, {"epochs": 1})
    assert source == "reused benchmarks/.cache/cache"
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(reused.state_dict()[name], value)
    assert _tiny_teacher(tmp_path, {"epochs": 2})[1].startswith("trained now")


def test_cached_teacher_resumes_an_interrupted_training_from_its_last_checkpoint(tmp_path):
    from transformers import default_data_collator

    batches = []

    def interrupted_in_step_two(features):
        batches.append(len(features))
        if len(batches) == 3:  # Accelerate's loader collates one batch ahead: this is during step 2
            raise KeyboardInterrupt("the session ended")
        return default_data_collator(features)

    with pytest.raises(KeyboardInterrupt):
        _tiny_teacher(tmp_path, {"epochs": 1}, collator=interrupted_in_step_two, max_steps=3)
    checkpoints = tmp_path / "cache.checkpoints"
    assert (checkpoints / "checkpoint-1").is_dir() and not (tmp_path / "cache" / "teacher_settings.json").exists()

    _, source = _tiny_teacher(tmp_path, {"epochs": 2}, max_steps=3)  # other settings: the checkpoint is not theirs
    assert source.startswith("trained now")
    batches.clear()
    with pytest.raises(KeyboardInterrupt):
        _tiny_teacher(tmp_path, {"epochs": 3}, collator=interrupted_in_step_two, max_steps=3)
    _, source = _tiny_teacher(tmp_path, {"epochs": 3}, max_steps=3)
    assert source.startswith("resumed from its last checkpoint") and not checkpoints.exists()


def test_majority_class_accuracy_is_the_share_of_the_commonest_label():
    from harness import majority_class_accuracy

    assert majority_class_accuracy(Dataset.from_dict({"labels": [0, 1, 1, 1, 2]})) == pytest.approx(0.6)


def test_quick_regenerate_prints_its_table_and_leaves_the_readme(tmp_path, capsys):
    quick = tmp_path / "quick"
    quick.mkdir()
    (quick / "minilm_rt.json").write_text(json.dumps(_synthetic_result()))
    summary = report.regenerate(quick, readme=None)
    assert "## Benchmarks" in capsys.readouterr().out and set(summary) == {"minilm_rt"}
    assert (quick / "summary.json").exists() and not (tmp_path / "summary.json").exists()


def readme_with_breakdown(tmp_path, file_name: str, breakdown: dict) -> str:
    """The README section `report.regenerate` writes for a synthetic text result plus one speed breakdown file."""
    (tmp_path / "minilm_rt.json").write_text(json.dumps(_synthetic_result()))
    (tmp_path / file_name).write_text(json.dumps(breakdown))
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    report.regenerate(tmp_path, readme)
    return readme.read_text()


def test_speed_breakdown_is_reported_under_the_text_benchmark(tmp_path):
    breakdown = {"input": "batch 32 x 64", "flop_ratio": 5.0, "environment": {"torch_threads": 2},
                 "eager": {"speedup": 3.0, "share_of_flop_ceiling": 0.6},
                 "compiled": {"speedup": 3.5, "share_of_flop_ceiling": 0.7},
                 "self_cpu_ms_per_forward_eager": {"teacher": {"matrix products (Linear)": 80.0, "LayerNorm": 20.0},
                                                   "rmtkd": {"matrix products (Linear)": 15.0, "LayerNorm": 20.0}}}
    text = readme_with_breakdown(tmp_path, "speed_breakdown.json", breakdown)
    assert "- teacher: 100 ms — matrix products (Linear) 80%, LayerNorm 20%" in text
    assert "- rmtkd: 35 ms — matrix products (Linear) 43%, LayerNorm 57%" in text
    assert "eager x3.00 (60% of the FLOP ratio x5.00)" in text and "`torch.compile` x3.50 (70%)" in text
    assert "row `rmtkd` at 2 thread(s)" in text


@pytest.mark.parametrize("row, threads, name", [("rmtkd", 2, "speed_breakdown.json"),
                                                ("rmtkd", 1, "speed_breakdown_threads1.json"),
                                                ("rmtkd_residual", 2, "speed_breakdown_rmtkd_residual.json"),
                                                ("rmtkd_residual", 1, "speed_breakdown_rmtkd_residual_threads1.json")])
def test_speed_breakdown_files_name_the_row_and_threads_that_differ_from_the_benchmark(row, threads, name):
    assert speed_breakdown.output_name(row, threads) == name


def test_a_repeated_breakdown_of_another_row_reports_its_blocks(tmp_path):
    breakdown = {"row": "rmtkd_residual", "input": "batch 32 x 64", "flop_ratio": 8.0,
                 "environment": {"torch_threads": 1},
                 "eager": {"speedup": 4.0, "share_of_flop_ceiling": 0.5, "speedups": [3.8, 4.0, 4.4],
                           "runs_per_block": 30},
                 "compiled": {"speedup": 4.4, "share_of_flop_ceiling": 0.55},
                 "self_cpu_ms_per_forward_eager": {"teacher": {"LayerNorm": 10.0}, "rmtkd": {"LayerNorm": 5.0}}}
    text = readme_with_breakdown(tmp_path, speed_breakdown.output_name("rmtkd_residual", 1), breakdown)
    assert ("row `rmtkd_residual` at 1 thread(s) (`benchmarks/speed_breakdown.py --row rmtkd_residual --threads 1`"
            in text)
    assert "eager x4.00, the median of 3 blocks of 30 rounds (range x3.80–x4.40) (50% of the FLOP ratio x8.00)" in text


@pytest.fixture(scope="module")
def bert_with_shared_qkv(bert):
    """The tiny BERT (4 heads of 8 features) with q/k/v of every layer factored through one shared projection."""
    from hf_rmtkd.modeling import apply_reduction_map, rmtkd_class_for

    base, reductions = copy.deepcopy(bert), {}
    for layer in range(bert.config.num_hidden_layers):
        q, k, v = (f"bert.encoder.layer.{layer}.attention.self.{name}" for name in ("query", "key", "value"))
        reductions.update({q: {"kind": "low_rank", "rank": 6},
                           k: {"kind": "low_rank", "rank": 6, "shares_projection_with": q},
                           v: {"kind": "low_rank", "rank": 6, "shares_projection_with": q}})
    apply_reduction_map(base, reductions)
    return rmtkd_class_for(base).from_base(base, reductions).eval()


def test_fusing_a_shared_projections_qkv_keeps_the_function(bert, bert_with_shared_qkv):
    assert not any(attention_shapes.shares_one_projection(a) for a in attention_shapes._attentions(bert))
    fused = attention_shapes.with_fused_qkv(bert_with_shared_qkv)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        expected, got = bert_with_shared_qkv(**inputs).logits, fused(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert isinstance(attention_shapes._attentions(fused)[0], attention_shapes.FusedQKVAttention)
    with pytest.raises(ValueError, match="fused_qkv needs"):
        attention_shapes.with_fused_qkv(bert)


@pytest.mark.parametrize("variant", ["query_key", "head_size"])
@pytest.mark.parametrize("model_name", ["bert", "bert_with_shared_qkv"])
def test_narrowed_heads_have_the_width_asked_for_and_fewer_flops(request, variant, model_name):
    from hf_rmtkd.bench import count_flops

    model = request.getfixturevalue(model_name)
    narrowed = (attention_shapes.with_query_key_width if variant == "query_key" else attention_shapes.with_head_size)(
        model, 2)
    heads = request.getfixturevalue("bert").config.num_attention_heads  # 4 heads of 8 features
    for block in (m for m in narrowed.modules() if isinstance(m, attention_shapes.BertAttention)):
        assert block.self.query.out_features == block.self.key.out_features == heads * 2
        assert block.self.value.out_features == heads * (2 if variant == "head_size" else 8)
        assert block.output.dense.in_features == block.self.value.out_features
    inputs = tiny_inputs("bert")
    _runs(narrowed)
    assert count_flops(narrowed, inputs) < count_flops(model, inputs)
    assert model(**inputs).logits.shape == narrowed(**inputs).logits.shape


@pytest.fixture(scope="module")
def bert_with_narrow_stream(bert):
    """The tiny BERT with the residual kind's narrowed stream and factored token embeddings."""
    import hf_rmtkd

    return hf_rmtkd.compress(bert, [tiny_inputs("bert", seed=i) for i in range(4)], kinds=("residual", "embedding"),
                             min_rank=2, progress=False).eval()


def test_the_folded_embeddings_variant_folds_a_copy(bert, bert_with_narrow_stream):
    folded = attention_shapes.with_folded_embeddings(bert_with_narrow_stream)
    assert type(folded.model.bert.embeddings).__name__ == "FoldedEmbeddings"
    assert type(bert_with_narrow_stream.model.bert.embeddings).__name__ == "BertEmbeddings"
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        assert torch.allclose(folded(**inputs).logits, bert_with_narrow_stream(**inputs).logits, atol=1e-5)


def test_attention_what_ifs_are_reported_with_what_reaches_the_targets(tmp_path):
    def variant(params, flops, speedup, held, held_b1):
        return {"param_ratio": params, "flop_ratio": flops, "speedup": speedup,
                "share_of_flop_ceiling": speedup / flops, "speedups": [speedup] * 3, "live_tensor_ratio_b32": held,
                "live_tensor_ratio_b1": held_b1}

    study = {"row": "rmtkd", "input": "batch 32 x 64", "environment": {"torch_threads": 2}, "runs_per_comparison": 30,
             "variants": {"rmtkd": variant(0.2, 5.0, 3.9, 0.31, 0.21), "fused_qkv": variant(0.2, 5.0, 4.1, 0.4, 0.21),
                          "head_size_8": variant(0.16, 9.0, 4.5, 0.15, 0.17),
                          "folded_embeddings_head_size_8": variant(0.15, 9.0, 4.5, 0.2, 0.14)}}
    study["variants"]["rmtkd"]["activation_peak_b32"] = {"peak_mb": 14.1, "held": [],
                                                         "at": "model.bert.encoder.layer.5.attention.self sdpa"}
    del study["variants"]["fused_qkv"]["live_tensor_ratio_b1"]  # a study from before batch 1 was measured
    study["folded_embeddings_vs_row"] = {"b32": {"speedups": [1.04, 1.05, 1.06], "speedup": 1.05, "runs": 90},
                                         "b1": {"speedups": [1.03, 1.02, 1.03], "speedup": 1.03, "runs": 90}}
    text = readme_with_breakdown(tmp_path, "attention_shapes.json", study)
    assert "What-if attention shapes of row `rmtkd` (`benchmarks/attention_shapes.py --row rmtkd`" in text
    assert "median of 3 comparisons of 30 rounds" in text
    assert ("The row as is against its embeddings folded (`hf_rmtkd.fold_embeddings`), the same function timed head "
            "to head (median of 3 comparisons of 90 rounds): x1.050 (x1.040, x1.050, x1.060) at batch 32, x1.030 "
            "(x1.030, x1.020, x1.030) at batch 1.") in text
    assert ("| the row's shapes | x0.200 | x5.00 | x3.90 | 78% | x0.310 | x0.210 "
            "| 14.1 MB, `encoder.layer.5.attention.self` |") in text
    assert "| q/k/v in one product | x0.200 | x5.00 | x4.10 | 82% | x0.400 | — | — |" in text
    assert ("| queries, keys and values of 8 features per head | x0.160 | x9.00 | x4.50 | 50% | x0.150 | x0.170 | — |"
            in text)
    assert ("| queries, keys and values of 8 features per head; embeddings folded into the narrow stream "
            "(`hf_rmtkd.fold_embeddings`) | x0.150 |") in text
    assert ("At 80% of the FLOP ratio or above: q/k/v in one product. Live tensors falling at least as far as the "
            "parameters: at batch 32, queries, keys and values of 8 features per head; at batch 1, queries, keys and "
            "values of 8 features per head; embeddings folded into the narrow stream (`hf_rmtkd.fold_embeddings`).") \
        in text


def test_fewer_heads_are_planned_at_the_same_target(bert, bert_measurements):
    teacher_params = bert.num_parameters()
    default, f, heads = head_fraction_speed.planned_model(bert, bert_measurements, None, target=0.4, min_rank=2)
    fewer, f_fewer, heads_fewer = head_fraction_speed.planned_model(bert, bert_measurements, 0.2, target=0.4,
                                                                    min_rank=2)
    n_heads = bert.config.num_attention_heads
    kept = sum(heads.get(name, n_heads) for name in heads | heads_fewer)
    assert sum(heads_fewer.get(name, n_heads) for name in heads | heads_fewer) < kept
    assert f_fewer >= f  # what the heads no longer hold, the other sites may keep
    for model in (default, fewer):
        assert model.num_parameters() <= round(0.4 * teacher_params)
        _runs(model)
    assert bert.num_parameters() == teacher_params  # the teacher is left alone


def test_the_head_fraction_study_is_reported_under_the_text_benchmark(tmp_path):
    def fraction(g, f, heads, speedup, flops):
        return {"head_signal_fraction": g, "signal_fraction": f, "heads_kept_total": heads, "param_ratio": 0.2,
                "flop_ratio": flops, "speedup": speedup, "speedups": [speedup] * 3,
                "share_of_flop_ceiling": speedup / flops}

    study = {"input": "batch 32 x 64", "environment": {"torch_threads": 2}, "runs_per_comparison": 30,
             "target_params": 0.2, "teacher_heads": 72,
             "fractions": [fraction(None, 0.9017, 52, 3.5, 5.27), fraction(0.4, 0.9424, 15, 5.2, 7.36)]}
    text = readme_with_breakdown(tmp_path, "head_fraction_speed.json", study)
    assert "Fewer heads at the same target (`benchmarks/head_fraction_speed.py`" in text
    assert "median of 3 comparisons of 30 rounds, fractions interleaved" in text
    assert "| f (default) | 0.902 | 52 | x0.200 | x5.27 | x3.50 | 66% |" in text
    assert "| 0.4 | 0.942 | 15 | x0.200 | x7.36 | x5.20 | 71% |" in text


@pytest.mark.parametrize("kinds", [DEFAULT_KINDS, ("residual", *DEFAULT_KINDS)])
def test_speed_breakdown_rebuilds_the_logged_shapes(bert, kinds):
    import hf_rmtkd

    small = hf_rmtkd.compress(bert, [tiny_inputs("bert", seed=i) for i in range(4)], kinds=kinds, min_rank=2,
                              progress=False)
    # The trainer logs a residual cut under the LayerNorm starting each segment (the last one writes full width).
    stream = {norm: {"kind": "residual", "d": bert.config.hidden_size, "k": entry["width"] - 1, "k_spectrum": 0}
              for norm, entry in small.config.reductions.items() if entry["kind"] == "residual" and entry["width"]}
    log = [{"sites": {**stream, **{c.site: {"kind": c.kind, "d": c.d, "k": c.rank, "k_spectrum": c.k_spectrum}
                                   for c in small.rmtkd_plan.cuts}}}]
    rebuilt = speed_breakdown.rmtkd_shaped_model(bert, log)
    assert rebuilt.config.reductions == small.config.reductions
    assert rebuilt.num_parameters() == small.num_parameters() < bert.num_parameters()


def test_shapes_rebuild_a_resnet_whose_streams_keep_fewer_channels():
    import hf_rmtkd

    resnet = tiny_model("resnet").eval()
    images = [tiny_inputs("resnet", batch=16, seed=i) for i in range(4)]
    small = hf_rmtkd.compress(resnet, images, kinds=("residual", "ffn_width"), min_rank=2, progress=False)
    # The trainer logs a ResNet stream under its first writer, with the channels it keeps.
    stream = {writer: {"kind": "residual", "d": 0, "k": entry["width"], "k_spectrum": 0}
              for writer, entry in small.config.reductions.items() if entry["kind"] == "residual_channels"}
    assert stream
    log = [{"sites": {**stream, **{c.site: {"kind": c.kind, "d": c.d, "k": c.rank, "k_spectrum": c.k_spectrum}
                                   for c in small.rmtkd_plan.cuts}}}]
    rebuilt = speed_breakdown.rmtkd_shaped_model(resnet, log)
    assert rebuilt.config.reductions == small.config.reductions
    assert rebuilt.num_parameters() == small.num_parameters() < resnet.num_parameters()


@pytest.mark.parametrize("name, kind", [
    ("aten::addmm", "matrix products (Linear)"), ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                                   "attention (SDPA, softmax)"),
    ("aten::native_layer_norm", "LayerNorm"), ("aten::gelu", "GELU"), ("aten::add", "elementwise (add, mul, ...)"),
    ("aten::embedding", "embedding lookup"), ("aten::transpose", "other"), ("aten::t", "other"),
])
def test_operator_kinds(name, kind):
    assert speed_breakdown.operator_kind(name) == kind


def test_row_book_saves_every_row_and_resumes(tmp_path):
    import harness

    path = tmp_path / "bench.partial.json"
    book = harness.RowBook(path, resume=True)
    assert book.add("teacher", lambda: {"accuracy": 0.8}) == {"accuracy": 0.8}
    assert json.loads(path.read_text())["rows"] == {"teacher": {"accuracy": 0.8}}

    def fail():
        raise AssertionError("a saved row must not be run again")

    resumed = harness.RowBook(path, resume=True)
    assert resumed.add("teacher", fail) == {"accuracy": 0.8}
    assert harness.RowBook(path, resume=False).rows == {}


def test_row_book_gives_rows_in_the_order_asked_not_the_order_finished(tmp_path):
    import harness

    path = tmp_path / "bench.partial.json"
    path.write_text(json.dumps({"rows": {"pca_energy": {"accuracy": 0.7}, "teacher": {"accuracy": 0.8}}}))
    book = harness.RowBook(path, resume=True)
    for name in ("teacher", "rmtkd", "pca_energy"):
        book.add(name, lambda: {"accuracy": 0.75})
    assert list(book.rows_in_order()) == ["teacher", "rmtkd", "pca_energy"]


def test_shared_row_books_split_the_rows_between_processes_and_merge_them(tmp_path):
    import harness

    def fail():
        raise AssertionError("a row claimed by a live process must be left to it")

    path = tmp_path / "bench.partial.json"
    first, second = (harness.RowBook(path, resume=False, shared=True) for _ in range(2))
    first.add("teacher", lambda: {"accuracy": 0.8})
    claim = tmp_path / "bench.partial.json.claims" / "rmtkd"
    claim.write_text(str(os.getppid()))  # a live process (this one's parent) is making "rmtkd"
    assert second.add("rmtkd", fail) is None
    assert second.left == second.unmade() == ["rmtkd"]
    assert second.add("pca_energy", lambda: {"accuracy": 0.7}) == {"accuracy": 0.7}
    assert json.loads(path.read_text())["rows"] == {"teacher": {"accuracy": 0.8}, "pca_energy": {"accuracy": 0.7}}
    assert not (claim.parent / "pca_energy").exists()  # released once saved

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    claim.write_text(str(finished.pid))  # a dead process's claim is taken over
    assert first.add("rmtkd", lambda: {"accuracy": 0.75}) == {"accuracy": 0.75}
    assert set(first.rows) == {"teacher", "pca_energy", "rmtkd"}
    assert second.unmade() == []  # the row it left is saved now


def test_a_worker_writes_the_results_once_the_rows_it_left_to_another_exist(tmp_path, monkeypatch):
    import run

    results = tmp_path / "quick"
    partial = results / "minilm_rt.quick.partial.json"
    claims = Path(f"{partial}.claims")
    claims.mkdir(parents=True)
    (claims / "rmtkd").write_text(str(os.getppid()))  # another live worker is making "rmtkd"

    def other_worker_saves_rmtkd():
        rows = json.loads(partial.read_text())["rows"] if partial.exists() else {}
        partial.write_text(json.dumps({"rows": {**rows, "rmtkd": {"accuracy": 0.8}}}))
        (claims / "rmtkd").unlink()

    def benchmark(name, quick, book):
        book.add("rmtkd", lambda: pytest.fail("claimed by another worker"))
        book.add("pca_energy", lambda: other_worker_saves_rmtkd() or {"accuracy": 0.7})
        return {"benchmark": name, "rows": dict(book.rows)}

    monkeypatch.setattr(run, "RESULTS", tmp_path)
    monkeypatch.setattr(run, "_run", benchmark)
    monkeypatch.setattr(report, "regenerate", lambda results, readme: None)
    monkeypatch.setattr(sys, "argv", ["run.py", "--quick", "--only", "minilm_rt", "--worker"])
    run.main()
    written = json.loads((results / "minilm_rt.json").read_text())
    assert written["rows"] == {"rmtkd": {"accuracy": 0.8}, "pca_energy": {"accuracy": 0.7}}
    assert not partial.exists() and not claims.exists()


def test_a_row_book_can_leave_the_timed_rows_to_another_run(tmp_path):
    import harness

    book = harness.RowBook(tmp_path / "rows.json", resume=False, make_timed=False)

    def fail():
        raise AssertionError("timed rows are left to a run with the machine to itself")

    assert book.add("rmtkd_tau_search", fail, timed=True) is None
    assert book.add("rmtkd_seed1", lambda: {"accuracy": 0.8}) == {"accuracy": 0.8}
    assert book.left == ["rmtkd_tau_search"]


@pytest.mark.parametrize("params,matched", [(102, True), (98, True), (104, False), (96, False)])
def test_a_baseline_is_matched_within_the_tolerance(params, matched):
    import harness

    record = harness.Rows.matched({"rank": 5}, params, target=100, steps=600, tolerance=0.03)
    assert record["matched"] is matched
    assert record["param_deviation_from_rmtkd"] == pytest.approx(params / 100 - 1)
    assert (record["rank"], record["distillation_steps"]) == (5, 600)


def test_extra_seeds_go_to_the_most_accurate_matched_baseline(tmp_path):
    import harness

    book = harness.RowBook(tmp_path / "rows.json", resume=False)
    book.rows = {"pca_energy": {"accuracy": 0.80, "matched": True}, "svd_uniform": {"accuracy": 0.78, "matched": True},
                 "layer_drop": {"accuracy": 0.90, "matched": False}}  # the most accurate, but larger: not eligible
    rows = harness.Rows(book, teacher=None, test=None, collator=None, inputs=None, seq_len=None, runs_b32=1,
                        runs_b1=1)
    made = []

    def make(name):
        def run(seed):
            made.append((name, seed))
            return torch.nn.Linear(2, 2)
        return run

    rows.accuracy_only = lambda name, compress: compress()  # no test split here: only which seeds run
    rows.strongest_seeds({name: (make(name),) for name in book.rows}, [1, 2])
    assert made == [("pca_energy", 1), ("pca_energy", 2)]


def test_extra_seed_rows_fold_into_their_row():
    rows = {"rmtkd": {"accuracy": 0.8, "params": 10}, "rmtkd_seed1": {"accuracy": 0.7, "params": 10},
            "pca_energy": {"accuracy": 0.6, "params": 10}, "rmtkd_no_distillation": {"accuracy": 0.5, "params": 10}}
    folded = report.fold_seed_rows(rows)
    assert set(folded) == {"rmtkd", "pca_energy", "rmtkd_no_distillation"}
    assert folded["rmtkd"]["seed_accuracies"] == [0.8, 0.7]
    assert "seed_accuracies" not in folded["pca_energy"] and "seed_accuracies" not in rows["rmtkd"]
    assert "seed_validation_accuracies" not in folded["rmtkd"]  # only rows that recorded validation keep it
    rows["rmtkd"]["validation_accuracy"], rows["rmtkd_seed1"]["validation_accuracy"] = 0.81, 0.79
    assert report.fold_seed_rows(rows)["rmtkd"]["seed_validation_accuracies"] == [0.81, 0.79]


def test_a_full_run_in_progress_gets_its_own_readme_section(tmp_path):
    result = _synthetic_result()
    (tmp_path / "minilm_rt.json").write_text(json.dumps(result))
    partial_rows = {"teacher": result["rows"]["teacher"], "rmtkd": result["rows"]["rmtkd"]}
    (tmp_path / "minilm_rt.full.partial.json").write_text(json.dumps({"rows": partial_rows}))
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    report.regenerate(tmp_path, readme)
    text = readme.read_text()
    assert "(full mode, in progress: 2 rows so far)" in text and "Targets so far" in text


@pytest.mark.parametrize(
    ("memory", "met"),
    [
        ({"inference_memory_ratio_b32": 0.39, "inference_peak_mb_b32": 39, "teacher_inference_peak_mb_b32": 100},
         True),
        ({"inference_memory_ratio_b32": 0.60, "inference_peak_mb_b32": 60, "teacher_inference_peak_mb_b32": 100},
         False),
        # warm peaks present: the target is judged on them, the cold peak is only reported
        ({"inference_memory_ratio_b32": 0.60, "inference_peak_mb_b32": 60, "teacher_inference_peak_mb_b32": 100,
          "warm_inference_memory_ratio_b32": 0.38, "warm_inference_peak_mb_b32": 30,
          "teacher_warm_inference_peak_mb_b32": 80}, True),
        ({"inference_memory_ratio_b32": 0.30, "inference_peak_mb_b32": 30, "teacher_inference_peak_mb_b32": 100,
          "warm_inference_memory_ratio_b32": 0.45, "warm_inference_peak_mb_b32": 36,
          "teacher_warm_inference_peak_mb_b32": 80}, False),
    ],
)
def test_memory_target_is_judged_on_the_warm_peak_when_measured(memory, met):
    result = _synthetic_result()  # rmtkd keeps 400 of the teacher's 1,000 parameters: x0.4
    result["rows"]["rmtkd"].update(memory)
    checks = {target: (ok, measured) for target, ok, measured in report.targets("minilm_rt", result)}
    ok, measured = checks["peak inference memory (batch 32) falls at least in proportion to params"]
    assert ok is met
    assert ("warm memory" in measured) == ("warm_inference_memory_ratio_b32" in memory)


@pytest.mark.parametrize(("rss_ratio", "tensor_ratio", "met"), [(0.39, 0.38, True), (0.45, 0.38, False),
                                                              (0.39, 0.41, False)])
def test_a_memory_target_is_met_only_if_the_probe_agrees(rss_ratio, tensor_ratio, met):
    result = _synthetic_result()  # params x0.4
    result["rows"]["rmtkd"].update(warm_inference_memory_ratio_b32=0.30, warm_inference_peak_mb_b32=3,
                                   teacher_warm_inference_peak_mb_b32=10, inference_memory_ratio_b32=0.5,
                                   inference_peak_mb_b32=10, teacher_inference_peak_mb_b32=20)
    probe = {"processes": 5, "batches": {"32": {
        "rss_warm_ratio": rss_ratio, "tensor_ratio": tensor_ratio,
        "rss_mb": {"rmtkd": {"warm_median": 10 * rss_ratio}, "teacher": {"warm_median": 10.0}},
        "tensor_mb": {"rmtkd": {"peak": 10 * tensor_ratio}, "teacher": {"peak": 10.0}}}}}
    checks = {target: (ok, value) for target, ok, value in report.targets("minilm_rt", result, probe)}
    ok, value = checks["peak inference memory (batch 32) falls at least in proportion to params"]
    assert ok is met
    # The glance at the top of the README shows the first clause: it names the probe's ratios too.
    assert report._first_clause(value) == (f"warm memory x0.300 (3 vs 10 MB, probe: warm RSS x{rss_ratio:.3f}, "
                                           f"live tensors x{tensor_ratio:.3f})")


def test_an_opt_in_row_is_held_to_the_targets_of_its_own_size_speed_and_memory(tmp_path):
    result = _synthetic_result()  # rmtkd: 400 of 1,000 params, 1.5 points lost; svd_uniform matched
    result["rows"]["rmtkd_residual"] = {**result["rows"]["rmtkd"], "params": 150, "accuracy": 0.805,
                                        "throughput_ratio_b32": 3.0, "flop_ratio": 3.5}
    result["rows"]["rmtkd_residual"].pop("seed_accuracies", None)
    checks = {target: (ok, value) for target, ok, value in report.targets("minilm_rt", result, row="rmtkd_residual")}
    assert checks[">= 80% fewer total params"] == (True, "85.0% fewer")
    assert checks[">= 2.8x batch-32 throughput"] == (True, "x3.00")
    # The baselines were matched to the default row's size, far from this row's: none is compared.
    assert not any("baseline" in target for target in checks)
    same_size = copy.deepcopy(result)
    same_size["rows"]["rmtkd_residual"]["params"] = same_size["rows"]["svd_uniform"]["params"]
    checks = {target: ok for target, ok, _ in report.targets("minilm_rt", same_size, row="rmtkd_residual")}
    assert checks["at least as accurate as every baseline at matched size"] is True
    (tmp_path / "minilm_rt.json").write_text(json.dumps(result))
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    report.regenerate(tmp_path, readme)
    text = readme.read_text()
    assert "- `minilm_rt`, opt-in row `rmtkd_residual`: 4 of 5 met; missed: file size falls at least in proportion " \
           "to params: size x0.400 vs params x0.150" in text
    assert "The same targets for the opt-in row `rmtkd_residual` (not the library's defaults):" in text


EXPORT_TARGET = ("file size of the deployed form (BatchNorm folded into the convolutions, both models) falls at least "
                 "in proportion to params")


@pytest.mark.parametrize("rmtkd_bytes,met", [(None, None), (1600, True), (1700, False)])
def test_the_deployed_file_size_is_judged_when_an_export_was_measured(rmtkd_bytes, met):
    result = _synthetic_result()  # params x0.4
    result["rows"]["teacher"].update(export_params=990, export_safetensors_bytes=4000)
    if rmtkd_bytes is not None:
        result["rows"]["rmtkd"].update(export_params=395, export_safetensors_bytes=rmtkd_bytes)
    checks = {target: (ok, measured) for target, ok, measured in report.targets("minilm_rt", result)}
    if met is None:
        assert EXPORT_TARGET not in checks
        return
    ok, measured = checks[EXPORT_TARGET]
    assert ok is met
    assert f"size x{rmtkd_bytes / 4000:.3f} vs params x0.400 (folded params x0.399" in measured


@pytest.mark.parametrize("student_kind", ["svd_uniform", "layer_drop"])
def test_kd_trainer_feature_term_pairs_hidden_states(bert, tmp_path, student_kind):
    """With β > 0 the baselines' loss adds the hidden-state term; a shallower student (layer dropping: 1 of the 2
    layers kept) is paired with evenly spaced teacher states instead of failing on the depth."""
    student = baselines.svd_uniform(bert if student_kind == "svd_uniform" else baselines.layer_drop(bert), 6)
    batch = {**tiny_inputs("bert", batch=4), "labels": torch.tensor([0, 1, 2, 0])}
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], disable_tqdm=True, use_cpu=True)
    losses = {}
    for beta in (0.0, 1.0):
        trainer = baselines.KDTrainer(model=student, args=args, teacher=bert, hidden_weight=beta)
        losses[beta] = float(trainer.compute_loss(student.train(), dict(batch)))
    assert math.isfinite(losses[1.0]) and losses[1.0] > losses[0.0]


def test_rows_with_a_non_default_loss_are_compared_only_with_each_other():
    result = _synthetic_result()  # rmtkd 0.795 (two seeds), teacher 0.81, svd_uniform 0.75 matched
    loss = {"distillation_alpha": 0.3, "distillation_hidden_weight": 1.0}
    result["rows"].update({
        "pca_energy_tuned_loss": {"accuracy": 0.85, "params": 400, "matched": True, "loss": loss},
        "rmtkd_tuned_loss": {"accuracy": 0.805, "params": 400, "loss": loss, "seed_accuracies": [0.805, 0.807]},
    })
    checks = {target: (ok, measured) for target, ok, measured in report.targets("minilm_rt", result)}
    # the default-loss comparison ignores the tuned PCA row, though it is more accurate than RMT-KD
    assert checks["at least as accurate as every baseline at matched size"] == (True, "vs svd_uniform")
    tuned = "(non-default loss: distillation_alpha 0.3, distillation_hidden_weight 1.0) <= 1.0 point accuracy loss"
    assert checks[tuned] == (True, "+0.40 points lost")
    assert checks["(non-default loss) at least as accurate as every baseline with the same loss"] == (
        False, "beaten by pca_energy_tuned_loss (by 4.40 points)")


def test_an_opt_in_rows_non_default_loss_variant_is_judged_with_it():
    result = _synthetic_result()  # teacher 0.81 at 1,000 params; baselines matched to rmtkd's 400
    result["match_tolerance"] = 0.03
    loss = {"distillation_alpha": 0.3, "distillation_hidden_weight": 1.0}
    result["rows"].update({
        "pca_energy_tuned_loss": {"accuracy": 0.80, "params": 400, "matched": True, "loss": loss},
        "rmtkd_residual": {**result["rows"]["rmtkd"], "params": 402, "accuracy": 0.78, "seed_accuracies": [0.78]},
        "rmtkd_residual_tuned_loss": {"accuracy": 0.806, "params": 402, "loss": loss},
    })
    checks = {target: (ok, value) for target, ok, value in report.targets("minilm_rt", result, row="rmtkd_residual")}
    tuned = "(non-default loss: distillation_alpha 0.3, distillation_hidden_weight 1.0) <= 1.0 point accuracy loss"
    assert checks[tuned] == (True, "+0.40 points lost")
    assert checks["(non-default loss) at least as accurate as every baseline with the same loss"] == (
        True, "vs pca_energy_tuned_loss")
    assert checks["<= 1.0 point accuracy loss"] == (False, "+3.00 points lost")  # the default loss stays judged


@pytest.mark.parametrize("benchmark, label", [
    ("minilm_rt", "at least as accurate as every baseline at matched size"),
    ("resnet_mnist", "at least as accurate as every baseline at matched size (the issue sets this for minilm_rt; "
                     "checked here as well)"),
])
def test_a_more_accurate_baseline_is_named_with_its_lead_and_the_target_labelled_where_the_issue_sets_it(
        benchmark, label):
    result = _synthetic_result()  # rmtkd 0.795 (two seeds), svd_uniform 0.75 matched
    result["rows"]["pca_energy"] = {"accuracy": 0.80, "params": 402, "matched": True}
    checks = {target: (ok, measured) for target, ok, measured in report.targets(benchmark, result)}
    assert checks[label] == (False, "beaten by pca_energy (by 0.50 points)")


def test_distil_takes_the_loss_by_the_library_names(bert, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], disable_tqdm=True, use_cpu=True)
    with pytest.raises(ValueError, match="distillation_beta"):
        baselines.distil(copy.deepcopy(bert), bert, None, steps=1, args=args, loss={"distillation_beta": 1.0})
    assert set(baselines.KD_LOSS_FIELDS.values()) <= set(inspect.signature(baselines.KDTrainer).parameters)


@pytest.mark.parametrize("keep_only", ["embedding", "encoder"])
def test_partial_cut_trainer_makes_only_its_part_of_the_planned_cuts(tmp_path, keep_only):
    ids = torch.randint(5, 128, (64, 12), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": (ids[:, 0] % 3).tolist()})
    args = RMTKDTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, report_to=[],
                                  save_strategy="no", disable_tqdm=True, use_cpu=True, target_params=0.3,
                                  sites_per_round=64, max_rounds=1, distillation_steps_per_round=1,
                                  max_metric_drop=10.0)
    trainer = distillation_sweep.PartialCutTrainer(model=tiny_model("bert"), args=args, train_dataset=data,
                                                   eval_dataset=data, keep_only=keep_only)
    trainer.train()
    kinds = [cut["kind"] for cut in trainer.rmtkd_log[0]["sites"].values()]
    if keep_only == "embedding":
        assert kinds == ["embedding"]
    else:
        assert kinds and "embedding" not in kinds


def test_stratified_folds_partition_the_training_part_with_every_label_in_each():
    import vision

    data = Dataset.from_dict({"id": list(range(100)), "labels": [i % 5 for i in range(100)]})
    folds = [vision.stratified_fold(data, fold, 5) for fold in range(5)]
    held_out = [sorted(split["validation"]["id"]) for split in folds]
    assert sorted(i for ids in held_out for i in ids) == list(range(100))  # every example held out exactly once
    for split, ids in zip(folds, held_out, strict=True):
        assert not set(split["train"]["id"]) & set(ids)
        assert sorted(split["validation"]["labels"]) == sorted(list(range(5)) * 4)  # 4 of each label
    with pytest.raises(ValueError, match="fold must lie in"):
        vision.stratified_fold(data, 5, 5)


def _fold_record(fold, accuracy, seed=0, **setting):
    return {"fold": fold, "seed": seed, "validation_examples": 800, "validation_accuracy": accuracy,
            "params": 111000, "teacher_only": False, **setting}


def _fold_records() -> list[dict]:
    """Sweep records of four settings: the reference on every fold (and one run repeated), PCA energy with two seeds
    a fold, another τ on four of the five folds, another distillation α on every fold; plus a teacher-only record."""
    import vision

    reference = {"quantile": vision.SPECTRUM_QUANTILE, "target_search": "signal_fraction",
                 "sites_per_round": vision.FULL.sites_per_round, "steps": vision.FULL.steps_per_round,
                 "final_steps": vision.FULL.final_steps, "max_metric_drop": vision.MAX_METRIC_DROP,
                 "learning_rate": vision.LEARNING_RATE, "alpha": 0.7}
    records = [_fold_record(fold, 0.97, **reference) for fold in range(5)]
    records += [_fold_record(fold, 0.98 if seed else 0.96, seed=seed, row="pca_energy", kd_steps=700)
                for fold in range(5) for seed in (0, 1)]  # two seeds a fold, 0.96 and 0.98: a mean of 0.97
    records += [_fold_record(fold, 0.99, **{**reference, "quantile": 0.45}) for fold in range(4)]  # a fold missing
    records += [_fold_record(fold, 0.95, **{**reference, "alpha": 0.5}) for fold in range(5)]
    records += [{"fold": 0, "teacher_only": True, "teacher_validation_accuracy": 0.98}]
    records += [_fold_record(0, 0.5, **reference)]  # the reference's fold 0, seed 0 again: the first run counts
    records[5]["validation_accuracy"] = 1.0  # pca, fold 0, seed 0: its fold's mean becomes 0.99
    return records


def test_vision_folds_pool_each_setting_over_every_fold_against_the_reference():
    import vision_folds

    records = _fold_records()
    table = {entry["setting"]: entry for entry in vision_folds.pool(records)}
    assert set(table) == {"rmtkd", "pca_energy", "rmtkd (alpha 0.5)"}  # τ 0.45 lacks fold 4
    pca = table["pca_energy"]
    assert pca["seeds_per_fold"] == [2] * 5
    assert pca["fold_accuracy"] == pytest.approx([0.99, 0.97, 0.97, 0.97, 0.97])
    assert pca["pooled_accuracy"] == pytest.approx(0.974)
    assert pca["difference_from_reference"]["mean"] == pytest.approx(0.004)
    assert pca["difference_from_reference"]["per_fold"] == pytest.approx([0.02, 0, 0, 0, 0])
    assert table["rmtkd"]["difference_from_reference"]["mean"] == 0
    assert table["rmtkd"]["seeds_per_fold"] == [1] * 5 and table["rmtkd"]["pooled_accuracy"] == pytest.approx(0.97)
    assert table["rmtkd (alpha 0.5)"]["difference_from_reference"]["mean"] == pytest.approx(-0.02)
    assert [entry["setting"] for entry in vision_folds.pool(records)] == ["pca_energy", "rmtkd", "rmtkd (alpha 0.5)"]


def test_cross_validation_is_reported_under_the_vision_benchmark(tmp_path):
    import vision_folds

    (tmp_path / "resnet_mnist.json").write_text(json.dumps(_synthetic_result()))
    folds = {"folds": 5, "validation_examples_per_fold": 800, "reference": "rmtkd",
             "reference_settings": vision_folds.REFERENCE, "settings": vision_folds.pool(_fold_records())}
    (tmp_path / "vision_folds.json").write_text(json.dumps(folds))
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    report.regenerate(tmp_path, readme)
    section = readme.read_text().split("### `resnet_mnist`")[1]
    assert "5-fold cross-validation" in section and "1/2 seed(s) per setting and fold" in section
    assert f"`rmtkd` is the benchmark's RMT-KD setting (τ {vision_folds.vision.SPECTRUM_QUANTILE}, mp_fit" in section
    assert "| pca_energy | 111,000 | 97.40% | 99.00%, 97.00%, 97.00%, 97.00%, 97.00% | +0.40 ± 0.89 |" in section
    assert "| rmtkd | 111,000 | 97.00% |" in section and "rmtkd (quantile 0.45)" not in section


def test_vision_speed_by_form_is_reported_under_the_vision_benchmark(tmp_path):
    (tmp_path / "resnet_mnist.json").write_text(json.dumps(_synthetic_result()))
    pair = {"speedup": 1.15, "first_ms": 3.7, "second_ms": 3.2, "flop_ratio": 1.73}
    profile = {"total_ms": 3.4, "convolution_ms": 2.6, "convolution_calls": 22, "max_pool_ms": 0.13}
    fold_speed = {"batch_size": 32, "threads": 1, "runs": 100, "cpu": "test CPU",
                  "pairs": {"deployed form in channels-last, teacher vs rmtkd": pair,
                            "teacher, trained vs deployed": {**pair, "flop_ratio": 1.0}},
                  "profile": {"teacher, deployed in channels-last": profile}}
    (tmp_path / "fold_speed.json").write_text(json.dumps(fold_speed))
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    report.regenerate(tmp_path, readme)
    section = readme.read_text().split("### `resnet_mnist`")[1]
    assert "`benchmarks/fold_speed.py --threads 1`: batch 32" in section
    assert ("- deployed form in channels-last, teacher vs rmtkd: x1.15 (3.70 → 3.20 ms), 66% of the FLOP ratio x1.73"
            in section)
    assert "- teacher, trained vs deployed: x1.15 (3.70 → 3.20 ms)\n" in section  # same FLOPs: no share
    assert ("- teacher, deployed in channels-last: 3.40 ms; 22 convolutions 2.60 ms (0.118 ms each on average), "
            "max pooling 4%") in section


def test_results_record_the_hosts_matrix_product_speed_and_the_readme_states_it(tmp_path):
    import harness

    env = harness.environment([0])
    assert env["matmul_gflops_at_start"] > 0
    result = _synthetic_result()
    result["environment"]["matmul_gflops_at_start"] = 181.4
    (tmp_path / "minilm_rt.json").write_text(json.dumps(result))
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    report.regenerate(tmp_path, readme)
    assert "load average 1.0 at start (a shared machine: timings are noisy), fp32 matrix products at 181 GFLOP/s" in (
        readme.read_text())


@pytest.mark.parametrize("value, clause", [
    ("72% (x3.82 of x5.27)", "72% (x3.82 of x5.27)"),
    ("warm memory x0.373 (48 vs 130 MB; cold x0.458 (69 vs 151 MB)) vs params x0.200",
     "warm memory x0.373 (48 vs 130 MB)"),
    ("a; b", "a"),
])
def test_the_first_clause_of_a_measured_value_keeps_its_brackets_balanced(value, clause):
    assert report._first_clause(value) == clause


def test_the_readme_opens_with_each_benchmarks_targets_met_and_missed(tmp_path):
    (tmp_path / "minilm_rt.json").write_text(json.dumps(_synthetic_result()))  # 60% cut, 1.5 points, x2.0 of x2.2
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    report.regenerate(tmp_path, readme)
    glance = readme.read_text().split("Targets at a glance")[1].split("###")[0]
    assert ("- `minilm_rt`: 3 of 6 met; missed: >= 80% fewer total params: 60.0% fewer; <= 1.0 point accuracy loss: "
            "+1.50 points lost; >= 2.8x batch-32 throughput: x2.00\n") in glance


def test_operator_times_count_every_call_of_a_known_forward_pass(bert):
    # The tiny BERT's encoder layers each run one LayerNorm after attention and one after the FFN, the embeddings one.
    layers = bert.config.num_hidden_layers
    operators = measure.operator_times_ms(bert, tiny_inputs("bert"), runs=4)
    assert operators["aten::layer_norm"][1] == 2 * layers + 1
    assert all(ms >= 0 for ms, _ in operators.values())
    by_kind = speed_breakdown.time_by_kind(bert, tiny_inputs("bert"), runs=4)
    assert by_kind["LayerNorm"] > 0 and list(by_kind.values()) == sorted(by_kind.values(), reverse=True)


def test_the_vision_profile_counts_the_resnets_convolutions():
    import fold_speed

    resnet = tiny_model("resnet")
    convolutions = sum(isinstance(module, torch.nn.Conv2d) for module in resnet.modules())
    profile = fold_speed.profile_forward(resnet, tiny_inputs("resnet"), runs=3)
    assert profile["convolution_calls"] == convolutions
    assert 0 < profile["convolution_ms"] <= profile["total_ms"] and profile["max_pool_ms"] > 0
