"""The ``residual`` kind on ResNets: keeping whole channels of every residual stream."""

import copy

import pytest
import torch
from test_trainer import CASES, assert_reloads_the_same, common_args, teacher_for
from tiny_models import tiny_model
from transformers import (
    AutoModelForImageClassification,
    ResNetBackbone,
    ResNetConfig,
    ResNetForImageClassification,
    ResNetModel,
)

import hf_rmtkd
from hf_rmtkd.batchnorm_folding import fold_batchnorm
from hf_rmtkd.calibration import collect_statistics
from hf_rmtkd.card import build_model_card
from hf_rmtkd.modeling import rmtkd_class_for
from hf_rmtkd.modeling.layers_rmtkd import build_reduction, plan_residual_channels
from hf_rmtkd.reductions.residual import cut_residual_stream
from hf_rmtkd.reductions.residual_channels import channel_streams, keep_stream_channels, stream_read_sites
from hf_rmtkd.trainer import RMTKDTrainer
from hf_rmtkd.training_args import RMTKDTrainingArguments

STAGES = "resnet.encoder.stages"


def resnet(head=True, **overrides):
    """A small ResNet in eval mode, with BatchNorm statistics and affine maps away from the identity."""
    torch.manual_seed(0)
    settings = {**dict(num_channels=1, embedding_size=16, hidden_sizes=[32, 64], depths=[2, 1],
                       layer_type="bottleneck", num_labels=5), **overrides}
    model = (ResNetForImageClassification if head else ResNetModel)(ResNetConfig(**settings)).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    return model


def images(n=4, seed=0, batch=16):
    generator = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(batch, 1, 28, 28, generator=generator)} for _ in range(n)]


def outputs(model):
    with torch.no_grad():
        result = model(**images(1, seed=99)[0])
    return result.logits if hasattr(result, "logits") else result.pooler_output


def statistics_of(model, streams):
    return collect_statistics(model, images(), stream_read_sites(streams), progress=False).accumulators


@pytest.mark.parametrize(
    "overrides, head, first_writers, last_readers",
    [
        # The stem's 16 channels differ from stage 0's 32: stage 0 opens with a projection shortcut, a new stream.
        ({}, True, ["resnet.embedder.embedder.convolution", f"{STAGES}.0.layers.0.shortcut.convolution",
                    f"{STAGES}.1.layers.0.shortcut.convolution"], ["classifier.1"]),
        # Same width and stride 1: the identity shortcut carries the stem's stream into stage 0.
        (dict(embedding_size=32), True, ["resnet.embedder.embedder.convolution",
                                         f"{STAGES}.1.layers.0.shortcut.convolution"], ["classifier.1"]),
        # Basic blocks write the stream with their second convolution.
        (dict(layer_type="basic"), True, ["resnet.embedder.embedder.convolution",
                                          f"{STAGES}.0.layers.0.shortcut.convolution",
                                          f"{STAGES}.1.layers.0.shortcut.convolution"], ["classifier.1"]),
        # No head: the last stream is the model's output and keeps its width.
        ({}, False, ["embedder.embedder.convolution", "encoder.stages.0.layers.0.shortcut.convolution"],
         ["encoder.stages.1.layers.0.shortcut.convolution", "encoder.stages.1.layers.0.layer.0.convolution"]),
    ],
)
def test_streams_run_between_projection_shortcuts(overrides, head, first_writers, last_readers):
    model = resnet(head, **overrides)
    streams = channel_streams(model)
    assert [s.writers[0] for s in streams] == first_writers
    assert list(streams[-1].reads[-1][1]) == last_readers
    last_conv = "layer.1" if overrides.get("layer_type") == "basic" else "layer.2"
    for stream in streams[1:]:
        assert all(w.endswith(("shortcut.convolution", "shortcut.normalization")) or f".{last_conv}." in w
                   for w in stream.writers), stream.writers


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ResNetBackbone(ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1])),
         r"ResNetBackbone returns the feature maps of stages \['stage2'\]"),
        (lambda: tiny_model("vit"), "channel_streams reads transformers ResNets .* model_type 'vit'"),
    ],
)
def test_models_whose_streams_cannot_be_cut_are_refused_by_name(build, message):
    with pytest.raises(ValueError, match=message):
        channel_streams(build())


def test_keeping_every_channel_keeps_the_function():
    model = resnet()
    reference = copy.deepcopy(model)
    streams = channel_streams(model)
    statistics = statistics_of(model, streams)
    for stream in streams:
        width = model.get_submodule(stream.writers[0]).out_channels
        keep_stream_channels(model, stream, torch.arange(width), statistics)
    torch.testing.assert_close(outputs(model), outputs(reference), atol=1e-5, rtol=1e-5)


def test_the_kept_channels_are_computed_exactly_up_to_their_readers():
    # Between writers and readers only per-channel operations run (BatchNorm, ReLU, max pooling), so the stem's kept
    # channels come out of the max pooling exactly as before.
    model = resnet()
    reference = copy.deepcopy(model)
    stem = channel_streams(model)[0]
    keep = torch.tensor([1, 4, 5, 9, 12])
    keep_stream_channels(model, stem, keep, statistics_of(model, [stem]))
    pixels = images(1, seed=5)[0]["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(model.resnet.embedder(pixels), reference.resnet.embedder(pixels)[:, keep])


def test_readers_are_refit_to_rebuild_what_was_dropped():
    # Drop one of two copies of a channel: the readers' refit rebuilds it from the copy, so the output is unchanged.
    model = resnet()
    stem = model.resnet.embedder.embedder
    with torch.no_grad():
        stem.convolution.weight[3] = stem.convolution.weight[7]
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(stem.normalization, name)[3] = getattr(stem.normalization, name)[7]
    reference = copy.deepcopy(model)
    stream = channel_streams(model)[0]
    keep_stream_channels(model, stream, torch.tensor([c for c in range(16) if c != 3]), statistics_of(model, [stream]))
    torch.testing.assert_close(outputs(model), outputs(reference), atol=1e-4, rtol=1e-4)


def test_the_streams_keep_their_outlier_count_and_reload(tmp_path):
    model = resnet()
    entries, sites = cut_residual_stream(model, images(), min_rank=2, progress=False)
    assert sites and set(sites) == set(entries)
    for writer, site in sites.items():
        assert site["kind"] == "residual" and site["k"] == max(site["k_spectrum"], 2) < site["d"]
        assert entries[writer]["kind"] == "residual_channels" and entries[writer]["width"] == site["k"]
        assert model.get_submodule(writer).out_channels == site["k"]
    wrapper = rmtkd_class_for(model).from_base(model, entries)  # checks every shape against the map
    wrapper.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(outputs(reloaded), outputs(model), atol=1e-6, rtol=1e-6)


def test_compress_narrows_the_streams_then_cuts_inside_and_folds(tmp_path):
    model = resnet()
    small = hf_rmtkd.compress(model, images(), kinds=("residual", "ffn_width"), min_rank=2, progress=False).eval()
    kinds = {entry["kind"] for entry in small.config.reductions.values()}
    assert kinds == {"residual_channels", "ffn_width"}, kinds
    assert small.num_parameters() < model.num_parameters()
    small.save_pretrained(tmp_path / "trained")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "trained").eval()
    torch.testing.assert_close(outputs(reloaded), outputs(small), atol=1e-6, rtol=1e-6)
    widths = [e["width"] for _, e in sorted(small.config.reductions.items()) if e["kind"] == "residual_channels"]
    card = build_model_card(small).text
    assert f"Residual stream: whole channels kept in {len(widths)} streams, in depth order: " \
           f"{', '.join(map(str, widths))}." in card
    folded = fold_batchnorm(small)  # the deployed form: BatchNorm folded into convolutions at their cut widths
    folded.save_pretrained(tmp_path / "deployed")
    redeployed = AutoModelForImageClassification.from_pretrained(tmp_path / "deployed").eval()
    torch.testing.assert_close(outputs(redeployed), outputs(small), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"kind": "residual_channels", "width": 4, "writers": ["resnet.embedder.embedder.convolution",
                                                               f"{STAGES}.0.layers.0.layer.2.normalization"],
          "readers": [f"{STAGES}.0.layers.0.layer.0.convolution"]},
         "writer 'resnet.encoder.stages.0.layers.0.layer.2.normalization' outputs 32 features, not the stream's 16"),
        ({"kind": "residual_channels", "width": 4, "writers": ["resnet.embedder.embedder.convolution"],
          "readers": [f"{STAGES}.0.layers.1.layer.0.convolution"]},
         "reader 'resnet.encoder.stages.0.layers.1.layer.0.convolution' reads 32 features, not the stream's 16"),
        ({"kind": "residual_channels", "width": 4, "writers": [], "readers": ["classifier.1"]},
         "needs non-empty 'writers' and 'readers'"),
    ],
)
def test_inconsistent_entries_name_the_module_at_fault(entry, message):
    with pytest.raises(ValueError, match=message):
        plan_residual_channels(resnet(), "resnet.embedder.embedder.convolution", entry)


def test_the_streams_are_narrowed_before_other_cuts():
    model = resnet()
    writer = f"{STAGES}.0.layers.1.layer.2.convolution"
    build_reduction(model, writer, {"kind": "low_rank", "rank": 2})
    with pytest.raises(ValueError, match=f"'{writer}' is a LowRankConv2d; narrow the residual streams before"):
        cut_residual_stream(model, images(), min_rank=2, progress=False)


def test_trainer_narrows_the_streams_in_the_first_round_and_the_result_reloads(tmp_path):
    teacher, train, test, metrics = teacher_for("resnet", tmp_path)
    args = RMTKDTrainingArguments(
        **common_args(tmp_path / "residual"), sites_per_round=64, max_rounds=1, distillation_steps_per_round=2,
        min_rank=2, max_metric_drop=1.0, target_params=0.5, reduction_kinds=["residual", "ffn_width", "low_rank"],
    )
    trainer = RMTKDTrainer(model=teacher, args=args, train_dataset=train, eval_dataset=test, compute_metrics=metrics)
    trainer.train()
    entry = trainer.rmtkd_log[0]
    assert "residual" in {site["kind"] for site in entry["sites"].values()} and entry["accepted"], entry
    assert "residual_channels" in {e["kind"] for e in trainer.model.config.reductions.values()}
    assert trainer.model.num_parameters() <= round(0.5 * entry["params_before"])
    assert_reloads_the_same(trainer, tmp_path / "final", test, AutoModelForImageClassification)


def test_feature_distillation_with_narrowed_streams_is_refused_by_name(tmp_path):
    build, task, metrics, _ = CASES["resnet"]
    args = RMTKDTrainingArguments(**common_args(tmp_path), reduction_kinds=["residual", "ffn_width"],
                                  distillation_hidden_weight=1.0)
    with pytest.raises(ValueError, match="distillation_hidden_weight must be 0 .* on a resnet model"):
        RMTKDTrainer(model=build(), args=args, train_dataset=task(8, 0), eval_dataset=task(8, 1),
                     compute_metrics=metrics)


def test_a_run_resumes_after_its_streams_were_cut(tmp_path):
    # Round 1 cuts the streams (and sites inside); a run resumed from its checkpoint rebuilds the narrowed ResNet
    # from the map and goes on cutting inside it, never cutting the streams twice.
    teacher, train, test, metrics = teacher_for("resnet", tmp_path)

    def trainer(rounds, model):
        args = RMTKDTrainingArguments(
            **common_args(tmp_path / "run"), sites_per_round=1, max_rounds=rounds, distillation_steps_per_round=2,
            min_rank=2, max_metric_drop=1.0, reduction_kinds=["residual", "ffn_width"], final_distillation_steps=0,
        )
        return RMTKDTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=metrics)

    first = trainer(1, copy.deepcopy(teacher))
    first.train()
    streams = {path: entry for path, entry in first.model.config.reductions.items()
               if entry["kind"] == "residual_channels"}
    assert streams
    resumed = trainer(2, copy.deepcopy(teacher))
    resumed.train(resume_from_checkpoint=True)
    assert [entry["round"] for entry in resumed.rmtkd_log] == [1, 2]
    assert all(site["kind"] != "residual" for site in resumed.rmtkd_log[1]["sites"].values())
    reductions = resumed.model.config.reductions
    assert {path: reductions[path] for path in streams} == streams
    assert len(reductions) > len(first.model.config.reductions)  # round 2 cut inside the narrowed layers
    assert_reloads_the_same(resumed, tmp_path / "final", test, AutoModelForImageClassification)


def test_a_bf16_model_keeps_its_dtype_through_the_cut():
    model = resnet().to(torch.bfloat16)
    low_precision = [{"pixel_values": batch["pixel_values"].to(torch.bfloat16)} for batch in images()]
    cut_residual_stream(model, low_precision, min_rank=2, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = model(pixel_values=images(1, seed=99)[0]["pixel_values"].to(torch.bfloat16)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
