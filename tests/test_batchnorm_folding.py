"""BatchNorm folding (`hf_rmtkd.fold_batchnorm`): same outputs, smaller checkpoint, loads back, clear errors.

Table-driven over the models a user would fold: a stock ResNet, an RMT-KD-compressed one (its inner BatchNorms
sliced by ``ffn_width``), and one whose convolution was factored (``low_rank``), which must keep that one norm.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tiny_models import tiny_inputs, tiny_model

import hf_rmtkd
from hf_rmtkd.batchnorm_folding import batchnorm_pairs
from hf_rmtkd.modeling import ModulePathError, RMTKDConfig, RMTKDPreTrainedModel, rmtkd_class_for
from hf_rmtkd.modeling.layers_rmtkd import apply_reduction_map
from hf_rmtkd.reductions import apply_low_rank

FACTORED_CONV = "resnet.encoder.stages.1.layers.0.layer.1.convolution"


def _with_trained_statistics(model):
    """Give every BatchNorm non-trivial statistics and affine terms, as training would (fresh ones are identities)."""
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(n, generator=generator))
            module.bias.data.copy_(torch.randn(n, generator=generator))
    return model


def stock():
    return _with_trained_statistics(tiny_model("resnet"))


def compressed():
    model = _with_trained_statistics(tiny_model("resnet"))
    calibration = [tiny_inputs("resnet", batch=8, seed=seed) for seed in range(4)]
    return hf_rmtkd.compress(model, calibration, kinds=("ffn_width",), min_rank=2, progress=False)


def factored():
    model = stock()
    conv = model.get_submodule(FACTORED_CONV)
    apply_low_rank(model, FACTORED_CONV, torch.eye(conv.in_channels)[:4])
    return rmtkd_class_for(model).from_base(model, {FACTORED_CONV: {"kind": "low_rank", "rank": 4}})


CASES = {"stock": stock, "compressed": compressed, "factored": factored}


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """case -> the model before and after folding, its reference outputs, and both saved checkpoints."""
    inputs = tiny_inputs("resnet", batch=4)
    items = {}
    for case, build in CASES.items():
        directory = tmp_path_factory.mktemp(case)
        model = build().eval()
        with torch.no_grad():
            reference = model(**inputs).logits
        unfolded = model if isinstance(model, RMTKDPreTrainedModel) else rmtkd_class_for(model).from_base(model, {})
        unfolded.save_pretrained(directory / "unfolded")
        norms = len([m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
        result = hf_rmtkd.fold_batchnorm(model)
        result.save_pretrained(directory / "folded")
        with torch.no_grad():
            output = result(**inputs).logits
        items[case] = {"reference": reference, "output": output, "model": result, "norms_before": norms,
                       "dir": directory, "inputs": inputs}
    return items


@pytest.mark.parametrize("case", CASES)
def test_folding_keeps_the_outputs(folded, case):
    item = folded[case]
    torch.testing.assert_close(item["output"], item["reference"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_every_foldable_norm_is_folded_and_recorded(folded, case):
    item = folded[case]
    model = item["model"]
    left = [name for name, m in model.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    entries = {path: entry for path, entry in model.config.reductions.items() if entry["kind"] == "folded_batchnorm"}
    # Only the factored convolution keeps its norm: its LowRankConv2d is not a plain nn.Conv2d.
    expected_left = [FACTORED_CONV.replace("convolution", "normalization")] if case == "factored" else []
    assert left == expected_left
    assert len(entries) == item["norms_before"] - len(left) > 0
    for path, entry in entries.items():
        assert isinstance(model.model.get_submodule(path), torch.nn.Identity)
        assert model.model.get_submodule(entry["into"]).bias is not None


@pytest.mark.parametrize("case", CASES)
def test_the_folded_checkpoint_is_smaller_and_loads_back(folded, case):
    item = folded[case]
    folded_dir, unfolded_dir = item["dir"] / "folded", item["dir"] / "unfolded"
    tensors = load_file(folded_dir / "model.safetensors")
    assert not [key for key in tensors if "normalization.running" in key and "stages.1.layers.0.layer.1" not in key]
    sizes = [(d / "model.safetensors").stat().st_size for d in (folded_dir, unfolded_dir)]
    assert sizes[0] < sizes[1]
    assert json.loads((folded_dir / "config.json").read_text())["reductions"] == item["model"].config.reductions
    loaded = transformers.AutoModelForImageClassification.from_pretrained(folded_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**item["inputs"]).logits, item["reference"], atol=1e-5, rtol=1e-5)


def test_a_model_without_batchnorm_is_refused():
    with pytest.raises(ValueError, match="BertForSequenceClassification has no BatchNorm2d"):
        hf_rmtkd.fold_batchnorm(tiny_model("bert"))


def test_pairs_are_named_relative_to_the_base_model():
    pairs = batchnorm_pairs(tiny_model("resnet"))
    assert ("resnet.embedder.embedder.normalization", "resnet.embedder.embedder.convolution") in pairs


NORM = "resnet.embedder.embedder.normalization"


@pytest.mark.parametrize(
    "path,entry,error,message",
    [
        ("resnet.embedder.embedder.convolution", {"into": "resnet.embedder.embedder.convolution"}, ModulePathError,
         "it is a Conv2d, not nn.BatchNorm2d"),
        (NORM, {}, ValueError, "needs 'into'"),
        (NORM, {"into": "resnet.encoder.stages.0.layers.0.layer.0.convolution"}, ModulePathError,
         "must be an nn.Conv2d with 16 output channels, got Conv2d with 8"),
        (NORM, {"into": "resnet.nowhere"}, ModulePathError, "Module 'resnet.nowhere' was not found"),
    ],
)
def test_a_bad_folded_batchnorm_entry_names_the_module(path, entry, error, message):
    with pytest.raises(error, match=message):
        apply_reduction_map(tiny_model("resnet"), {path: {"kind": "folded_batchnorm", **entry}})


def test_an_entry_is_installed_after_the_width_cut_of_its_convolution():
    """config.json sorts keys, so a fold may come before the ffn_width entry that narrows its convolution."""
    model = compressed()
    width_entries = {p: e for p, e in model.config.reductions.items() if e["kind"] == "ffn_width"}
    assert width_entries
    folded = hf_rmtkd.fold_batchnorm(model)
    config = RMTKDConfig(base_config=folded.config.base_config, reductions=dict(reversed(
        list(folded.config.reductions.items()))))
    with torch.device("meta"):
        rebuilt = type(folded)(config)
    shapes = {name: t.shape for name, t in rebuilt.state_dict().items()}
    assert shapes == {name: t.shape for name, t in folded.state_dict().items()}
