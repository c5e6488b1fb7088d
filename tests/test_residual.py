"""The ``residual`` kind: narrowing the residual stream of post-LayerNorm encoders (BERT family)."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_checkpoints import NO_PLUGIN_SCRIPT
from test_trainer import assert_reloads_the_same, common_args, teacher_for
from tiny_models import tiny_inputs, tiny_model
from transformers import AutoModelForSequenceClassification

import hf_rmtkd  # noqa: F401  (registers the Auto classes)
from hf_rmtkd.calibration import calibrate, collect_statistics
from hf_rmtkd.card import build_model_card
from hf_rmtkd.cut import apply_plan
from hf_rmtkd.modeling import rmtkd_class_for
from hf_rmtkd.modeling.layers_rmtkd import ReducedLayerNorm, apply_reduction_map
from hf_rmtkd.plan import plan_reductions
from hf_rmtkd.reductions.residual import (
    cut_residual_stream,
    hidden_state_coordinates,
    narrow_residual_stream,
    stream_segments,
    stream_sites,
    stream_widths,
)
from hf_rmtkd.trainer import RMTKDTrainer
from hf_rmtkd.training_args import RMTKDTrainingArguments

HIDDEN = 32  # tiny_model's hidden size


def calibration(arch="bert", n=6):
    return [tiny_inputs(arch, batch=8, seq_len=12, seed=seed) for seed in range(n)]


def narrowed(arch, ranks):
    model = tiny_model(arch)
    reference = copy.deepcopy(model)
    segments = stream_segments(model)
    statistics = collect_statistics(model, calibration(arch), stream_sites(segments), progress=False)
    entries = narrow_residual_stream(model, statistics.accumulators, ranks(len(segments)))
    return reference, model, entries


def logits(model, arch="bert"):
    with torch.no_grad():
        return model(**tiny_inputs(arch, batch=4, seq_len=12, seed=99)).logits


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_a_complete_basis_keeps_the_function(arch):
    # k = d - 1 centred directions plus the all-ones one span the whole stream: only rounding may differ.
    reference, model, entries = narrowed(arch, lambda n: [HIDDEN - 1] * n)
    torch.testing.assert_close(logits(model, arch), logits(reference, arch), atol=1e-5, rtol=1e-5)
    assert sum(isinstance(m, ReducedLayerNorm) for m in model.modules()) == len(entries) == 5


@pytest.mark.parametrize("k", [4, 12])
def test_a_narrow_stream_shrinks_every_stream_linear(k):
    reference, model, entries = narrowed("bert", lambda n: [k] * n)
    layer = model.bert.encoder.layer[1]
    assert layer.attention.self.query.in_features == k + 1
    assert layer.attention.output.dense.out_features == k + 1
    assert layer.intermediate.dense.in_features == k + 1 and layer.output.dense.out_features == k + 1
    assert model.bert.embeddings.word_embeddings.embedding_dim == HIDDEN  # the embeddings' sum stays full width
    assert model.bert.pooler.dense.in_features == HIDDEN  # the last norm writes full width for the heads
    assert model.num_parameters() < reference.num_parameters()
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_a_narrowed_model_reloads_with_and_without_the_plugin(tmp_path, arch):
    _, model, entries = narrowed(arch, lambda n: [6] * n)
    wrapper = rmtkd_class_for(model).from_base(model, entries)
    wrapper.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), logits(model), atol=0, rtol=0)
    shapes = copy.deepcopy(tiny_model(arch))
    apply_reduction_map(shapes, entries)  # the map alone rebuilds every shape
    assert {n: p.shape for n, p in shapes.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    # In a fresh interpreter where hf_rmtkd cannot be imported: the checkpoint's own code rebuilds it.
    inputs = tiny_inputs(arch, batch=4, seq_len=12, seed=99)
    save_file(inputs, tmp_path / "inputs.safetensors")
    job = {"dir": str(tmp_path), "auto_class": "AutoModelForSequenceClassification", "remote": True,
           "generate": False, "out": str(tmp_path / "out.safetensors")}
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-I", "-c", NO_PLUGIN_SCRIPT, json.dumps([job])], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not json.loads(proc.stdout.strip().splitlines()[-1])["hf_rmtkd_imported"]
    torch.testing.assert_close(load_file(job["out"])["output"], logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_cuts_inside_the_layers_compose_with_a_narrow_stream(tmp_path, arch):
    _, model, entries = narrowed(arch, lambda n: [10] * n)
    measurements = calibrate(model, calibration(arch), progress=False)
    plan = plan_reductions(measurements, model, min_rank=2, kinds=("ffn_width", "low_rank", "embedding"))
    assert plan.cuts
    entries = {**entries, **apply_plan(model, plan, measurements)}
    wrapper = rmtkd_class_for(model).from_base(model, entries)  # checks every shape against the map
    wrapper.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-6, rtol=1e-6)


def test_the_stream_keeps_its_outlier_count():
    model = tiny_model("bert")
    entries, sites = cut_residual_stream(model, calibration(), min_rank=2, progress=False)
    assert len(sites) == 4 and all(s["kind"] == "residual" and s["d"] == HIDDEN for s in sites.values())
    for norm, site in sites.items():
        assert site["k"] == min(HIDDEN - 1, max(site["k_spectrum"], 2))
        assert entries[norm]["width"] == site["k"] + 1


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: tiny_model("vit"), "model_type 'vit'"),
        (lambda: tiny_model("llama"), "model_type 'llama'"),
    ],
)
def test_other_architectures_are_refused_by_name(build, message):
    with pytest.raises(ValueError, match=message):
        stream_segments(build())


def test_the_stream_is_narrowed_before_other_cuts():
    model = tiny_model("bert")
    measurements = calibrate(model, calibration(), progress=False)
    plan = plan_reductions(measurements, model, min_rank=2, kinds=("low_rank",))
    apply_plan(model, plan, measurements)
    segments = stream_segments(model)
    statistics = collect_statistics(model, calibration(), stream_sites(segments), progress=False)
    with pytest.raises(ValueError, match="narrow the residual stream before"):
        narrow_residual_stream(model, statistics.accumulators, [4] * len(segments))


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("rank", [12, HIDDEN - 1])
def test_the_teachers_hidden_states_move_into_the_narrow_streams_coordinates(arch, rank):
    # Rebuilt from the calibration data alone, the coordinates are the cut's own: the embeddings' norm reads the full
    # width, so the first hidden state matches exactly at any rank; with a complete basis every one does.
    reference, model, entries = narrowed(arch, lambda n: [rank] * n)
    coordinates = hidden_state_coordinates(reference, stream_widths(entries), calibration(arch), progress=False)
    inputs = tiny_inputs(arch, batch=4, seq_len=12, seed=99)
    with torch.no_grad():
        student = model(**inputs, output_hidden_states=True).hidden_states
        teacher = reference(**inputs, output_hidden_states=True).hidden_states
    assert len(coordinates) == len(teacher) and coordinates[-1] is None
    assert [tuple(c[0].shape) for c in coordinates[:-1]] == [(HIDDEN, rank + 1)] * (len(teacher) - 1)
    moved = [t.double() if c is None else (t.double() - c[1]) @ c[0]
             for t, c in zip(teacher, coordinates, strict=True)]
    for s, t in zip(student, moved if rank == HIDDEN - 1 else moved[:1], strict=False):
        torch.testing.assert_close(s.double(), t, atol=1e-4, rtol=1e-4)


def test_feature_distillation_compares_a_narrow_stream_in_its_coordinates_and_resumes(tmp_path):
    teacher, train, test, metrics = teacher_for("bert", tmp_path)

    def trainer(rounds, final_steps, model):
        args = RMTKDTrainingArguments(
            **common_args(tmp_path / "run"), sites_per_round=64, max_rounds=rounds, distillation_steps_per_round=2,
            min_rank=2, max_metric_drop=1.0, distillation_hidden_weight=1.0, final_distillation_steps=final_steps,
            reduction_kinds=["residual", "ffn_width"],
        )
        return RMTKDTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=metrics)

    first = trainer(1, 0, copy.deepcopy(teacher))
    first.train()
    assert first.rmtkd_log[0]["accepted"] and "residual" in {s["kind"] for s in first.rmtkd_log[0]["sites"].values()}
    batch = {k: torch.tensor(v) for k, v in train[:8].items()}
    first.teacher = hf_rmtkd.distillation.teacher_copy(teacher)  # the uncut model: a wider stream than the student's
    with torch.no_grad():
        with_features = first.compute_loss(first.model.train(), dict(batch))
        first.args.distillation_hidden_weight = 0.0
        logits_only = first.compute_loss(first.model, dict(batch))
    assert torch.isfinite(with_features) and with_features > logits_only
    # The round folder keeps the coordinates: a resumed run's final phase, from the uncut model, uses the same ones.
    assert (tmp_path / "run" / "rmtkd-round-1" / "stream_coordinates.safetensors").exists()
    resumed = trainer(2, 2, copy.deepcopy(teacher))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.rmtkd_final is not None
    for ours, theirs in zip(resumed._stream_coordinates, first._stream_coordinates, strict=True):
        assert (ours is None and theirs is None) or all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_trainer_narrows_the_stream_in_the_first_round_and_the_result_reloads(tmp_path):
    teacher, train, test, metrics = teacher_for("bert", tmp_path)
    args = RMTKDTrainingArguments(
        **common_args(tmp_path / "residual"), sites_per_round=64, max_rounds=1, distillation_steps_per_round=2,
        min_rank=2, max_metric_drop=1.0, target_params=0.25,
        reduction_kinds=["residual", "ffn_width", "low_rank", "embedding", "attention_heads"],
    )
    trainer = RMTKDTrainer(model=teacher, args=args, train_dataset=train, eval_dataset=test, compute_metrics=metrics)
    trainer.train()
    entry = trainer.rmtkd_log[0]
    kinds = {site["kind"] for site in entry["sites"].values()}
    assert "residual" in kinds and entry["accepted"], entry
    assert trainer.model.num_parameters() <= round(0.25 * entry["params_before"])
    assert_reloads_the_same(trainer, tmp_path / "final", test)


def test_compress_narrows_the_stream_then_cuts_inside(tmp_path):
    model = tiny_model("bert")
    small = hf_rmtkd.compress(model, calibration(), kinds=("residual", "ffn_width", "low_rank"), min_rank=2,
                              progress=False)
    kinds = {entry["kind"] for entry in small.config.reductions.values()}
    assert "residual" in kinds and kinds - {"residual"}, kinds
    assert f"Residual stream: between every two LayerNorms, {HIDDEN} → " in build_model_card(small).text
    small.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), logits(small.eval()), atol=1e-6, rtol=1e-6)
    assert small.num_parameters() < model.num_parameters()


def test_a_narrow_stream_runs_under_bf16_autocast():
    _, model, _ = narrowed("bert", lambda n: [12] * n)
    reference = logits(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = logits(model)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), reference, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_a_reduced_layernorm_built_without_a_cut_is_a_layernorm_of_the_full_width_input(dtype, tolerance):
    # Shapes only (a model rebuilt from its config): defined weights, never torch.empty's leftover memory.
    norm = ReducedLayerNorm(16, 16, 16, full_input=True, eps=1e-12).to(dtype)
    x = (torch.randn(4, 7, 16) * 3 + 5).to(dtype)  # a mean far from 0, as a stream can have
    expected = torch.nn.functional.layer_norm(x.float(), (16,), eps=1e-12)
    assert torch.allclose(norm(x).float(), expected, atol=tolerance, rtol=tolerance)
