"""Reduced checkpoints: save -> load with the plugin and without it (remote code), pipelines, generation, parameter
counts, training, stock export and load-time errors. Table-driven over kinds x architectures on tiny models."""

import ast
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_models import ffn_sites, site_statistics, tiny_inputs, tiny_model

from hf_rmtkd.export import can_export_stock, export_stock
from hf_rmtkd.modeling import (
    FORMAT_VERSION,
    LowRankLinear,
    ModulePathError,
    RMTKDConfig,
    RMTKDForSequenceClassification,
    RMTKDPreTrainedModel,
    register_auto_classes,
    rmtkd_class_for,
)
from hf_rmtkd.reductions import REDUCTIONS, apply_low_rank, low_rank_parameters

register_auto_classes()

# case id -> (arch, head, config overrides, sites). A site is (kind, module path, rank), ("ffn_width", index into
# ffn_sites(arch, head), width) or ("attention_heads", layer, kept heads); an embedding site may end with the token
# ids it stores codes for. Sites are cut in order, each from statistics of the model as cut so far.
CASES = {
    "bert-seqcls": (
        "bert",
        "sequence_classification",
        {"id2label": {0: "negative", 1: "neutral", 2: "positive"}},
        [
            ("low_rank", "bert.encoder.layer.0.attention.self.query", 8),
            ("low_rank", "bert.encoder.layer.0.attention.self.key", 8, "bert.encoder.layer.0.attention.self.query"),
            ("low_rank", "bert.encoder.layer.0.attention.self.value", 8, "bert.encoder.layer.0.attention.self.query"),
            ("ffn_width", 0, 24),
            ("ffn_width", 1, 40),
            ("embedding", "bert.embeddings.word_embeddings", 12),
        ],
    ),
    # Heads 1 and 3 of layer 0 dropped, then q/k/v factored at their narrowed width.
    "bert-heads": (
        "bert",
        "sequence_classification",
        {},
        [
            ("attention_heads", 0, [0, 2]),
            ("low_rank", "bert.encoder.layer.0.attention.self.query", 8),
            ("low_rank", "bert.encoder.layer.0.attention.self.key", 8, "bert.encoder.layer.0.attention.self.query"),
            ("ffn_width", 1, 40),
        ],
    ),
    # Codes stored for every other token only: the rest read their nearest kept token's code.
    "bert-vocab": (
        "bert",
        "sequence_classification",
        {},
        [("embedding", "bert.embeddings.word_embeddings", 12, range(0, 128, 2)), ("ffn_width", 0, 24)],
    ),
    "bert-base": (
        "bert",
        "base",
        {},
        [
            ("low_rank", "encoder.layer.1.attention.output.dense", 8),
            ("ffn_width", 0, 24),
        ],
    ),
    "bert-tokcls": (
        "bert",
        "token_classification",
        {},
        [
            ("ffn_width", 1, 16),
            ("embedding", "bert.embeddings.word_embeddings", 16),
        ],
    ),
    "bert-mlm-tied": (
        "bert",
        "masked_lm",
        {},
        [
            ("low_rank", "bert.encoder.layer.0.attention.self.key", 8),
            ("ffn_width", 0, 24),
        ],
    ),
    "roberta-seqcls": (
        "roberta",
        "sequence_classification",
        {},
        [
            ("low_rank", "roberta.encoder.layer.0.attention.output.dense", 8),
            ("ffn_width", 1, 24),
            ("embedding", "roberta.embeddings.word_embeddings", 12),
        ],
    ),
    "distilbert-seqcls": (
        "distilbert",
        "sequence_classification",
        {},
        [
            ("low_rank", "distilbert.transformer.layer.0.attention.q_lin", 8),
            ("low_rank", "distilbert.transformer.layer.0.attention.v_lin", 8,
             "distilbert.transformer.layer.0.attention.q_lin"),
            ("ffn_width", 0, 24),
            ("embedding", "distilbert.embeddings.word_embeddings", 12),
        ],
    ),
    "vit-imgcls": (
        "vit",
        "image_classification",
        {},
        [
            ("low_rank", "vit.layers.0.attention.q_proj", 8),
            ("low_rank", "vit.layers.0.attention.k_proj", 8, "vit.layers.0.attention.q_proj"),
            ("ffn_width", 1, 24),
        ],
    ),
    "resnet-imgcls": (
        "resnet",
        "image_classification",
        {},
        [
            ("low_rank", "resnet.encoder.stages.1.layers.0.shortcut.convolution", 8),
            ("ffn_width", 0, 4),  # 3x3 consumer
            ("ffn_width", 3, 8),  # 1x1 consumer
        ],
    ),
    "llama-causal": (
        "llama",
        "causal_lm",
        {},
        [
            ("low_rank", "model.layers.0.self_attn.q_proj", 8),
            ("low_rank", "model.layers.0.self_attn.k_proj", 8),
            ("low_rank", "model.layers.0.self_attn.v_proj", 8, "model.layers.0.self_attn.k_proj"),
            ("ffn_width", 0, 24),
            ("ffn_width", 1, 40),
            ("embedding", "model.embed_tokens", 12),
        ],
    ),
    "llama-causal-tied": (
        "llama",
        "causal_lm",
        {"tie_word_embeddings": True},
        [
            ("low_rank", "model.layers.1.mlp.down_proj", 8),
            ("ffn_width", 0, 24),
        ],
    ),
}

AUTO_CLASS = {
    "base": "AutoModel",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "masked_lm": "AutoModelForMaskedLM",
    "causal_lm": "AutoModelForCausalLM",
    "image_classification": "AutoModelForImageClassification",
}


def output_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def reduce_model(arch, head, overrides, sites, seed=0):
    """Cut a tiny model at ``sites``; return (model, inputs, reduction map, expected parameter count)."""
    model, inputs = tiny_model(arch, head, seed=seed, **overrides), tiny_inputs(arch, batch=16)
    reductions, expected = {}, model.num_parameters()
    for kind, where, size, *holder in sites:
        if kind == "ffn_width":
            path, producers = ffn_sites(arch, head)[where]
            entry = {"kind": kind, "width": size, "producers": producers}
        elif kind == "attention_heads":  # `where`: the layer; `size`: the heads kept
            block = f"{model.base_model_prefix}.encoder.layer.{where}.attention"
            head_dim = model.config.hidden_size // model.config.num_attention_heads
            path = f"{block}.output.dense"
            entry = {"kind": kind, "width": len(size) * head_dim, "head_dim": head_dim, "heads": size,
                     "producers": [f"{block}.self.{name}" for name in ("query", "key", "value")]}
        else:
            path, entry = where, {"kind": kind, "rank": size}
        options = {}
        if kind == "embedding" and holder:  # the token ids whose codes are stored
            options["tokens"] = list(holder[0])
            entry["rows"] = len(options["tokens"])
        elif holder:  # a low_rank layer reading the same input as `holder`, sharing its projection
            entry["shares_projection_with"] = holder[0]
        expected -= REDUCTIONS[kind].parameter_savings(model, path, entry)
        REDUCTIONS[kind].apply(model, path, entry, **site_statistics(model, path, inputs, kind), **options)
        reductions[path] = entry
    return model, inputs, reductions, expected


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case cut, wrapped, saved; with its inputs and reference outputs."""
    cases = {}
    for case, (arch, head, overrides, sites) in CASES.items():
        model, inputs, reductions, expected = reduce_model(arch, head, overrides, sites)
        summary = {path: {"k": entry.get("rank", entry.get("width"))} for path, entry in reductions.items()}
        wrapper = rmtkd_class_for(model).from_base(model, reductions, spectral_summary=summary)
        directory = tmp_path_factory.mktemp(case)
        wrapper.save_pretrained(directory)
        save_file({name: t.contiguous() for name, t in inputs.items()}, directory / "inputs.safetensors")
        cases[case] = {
            "wrapper": wrapper,
            "inputs": inputs,
            "reference": output_of(wrapper, inputs),
            "dir": directory,
            "auto_class": AUTO_CLASS[head],
            "expected_parameters": expected,
        }
    return cases


# The same width for every FFN, so the result is expressible as the stock architecture.
STOCK_CASES = {
    "bert": ("bert", "sequence_classification"),
    "roberta": ("roberta", "sequence_classification"),
    "distilbert": ("distilbert", "sequence_classification"),
    "vit": ("vit", "image_classification"),
    "llama": ("llama", "causal_lm"),
}


@pytest.fixture(scope="module")
def stock_exports(tmp_path_factory):
    exports = {}
    for case, (arch, head) in STOCK_CASES.items():
        sites = [("ffn_width", i, 24) for i in range(len(ffn_sites(arch, head)))]
        model, inputs, reductions, _ = reduce_model(arch, head, {}, sites)
        wrapper = rmtkd_class_for(model).from_base(model, reductions)
        directory = tmp_path_factory.mktemp(f"stock-{case}")
        assert can_export_stock(wrapper)
        export_stock(wrapper, directory)
        save_file({name: t.contiguous() for name, t in inputs.items()}, directory / "inputs.safetensors")
        exports[case] = {
            "wrapper": wrapper,
            "reference": output_of(wrapper, inputs),
            "dir": directory,
            "auto_class": AUTO_CLASS[head],
            "width_field": "hidden_dim" if arch == "distilbert" else "intermediate_size",
        }
    return exports


# Runs in a fresh interpreter where `import hf_rmtkd` fails: what users without the plugin get.
NO_PLUGIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_rmtkd"] = None  # make the plugin unimportable, installed or not
    import torch, transformers
    from safetensors.torch import load_file, save_file

    results = {}
    for job in json.loads(sys.argv[1]):
        auto_class = getattr(transformers, job["auto_class"])
        model = auto_class.from_pretrained(job["dir"], trust_remote_code=job["remote"])
        inputs = load_file(job["dir"] + "/inputs.safetensors")
        with torch.no_grad():
            out = model(**inputs)
        tensors = {"output": (out.logits if hasattr(out, "logits") else out.last_hidden_state).contiguous()}
        if job["generate"]:
            tensors["generated"] = model.generate(
                inputs["input_ids"][:2], attention_mask=inputs["attention_mask"][:2], max_new_tokens=6, do_sample=False
            )
        save_file(tensors, job["out"])
        results[job["dir"]] = {
            "class": type(model).__module__ + "." + type(model).__name__,
            "training": model.training,
            "num_parameters": model.num_parameters(),
        }
    results["hf_rmtkd_imported"] = any(name.startswith("hf_rmtkd") and sys.modules[name] for name in sys.modules)
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def no_plugin(saved, stock_exports, tmp_path_factory):
    """Load every saved case (remote code) and every stock export (plain transformers) in one clean subprocess."""
    work = tmp_path_factory.mktemp("no-plugin")
    jobs = []
    for case, item in saved.items():
        generate = item["auto_class"] == "AutoModelForCausalLM"
        jobs.append(
            {
                "dir": str(item["dir"]),
                "auto_class": item["auto_class"],
                "remote": True,
                "generate": generate,
                "out": str(work / f"{case}.safetensors"),
            }
        )
    for case, item in stock_exports.items():
        jobs.append(
            {
                "dir": str(item["dir"]),
                "auto_class": item["auto_class"],
                "remote": False,
                "generate": False,
                "out": str(work / f"stock-{case}.safetensors"),
            }
        )
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(work / "hf_home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", NO_PLUGIN_SCRIPT, json.dumps(jobs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"results": results, "outputs": {Path(job["out"]).stem: load_file(job["out"]) for job in jobs}}


@pytest.mark.parametrize("case", CASES)
def test_reload_with_plugin_reproduces_outputs(saved, case):
    item = saved[case]
    model = getattr(transformers, item["auto_class"]).from_pretrained(item["dir"])
    assert isinstance(model, type(item["wrapper"])) and not model.training
    assert model.config.reductions == item["wrapper"].config.reductions
    torch.testing.assert_close(output_of(model, item["inputs"]), item["reference"], atol=1e-5, rtol=0)
    assert model.num_parameters() == item["wrapper"].num_parameters() == item["expected_parameters"]


@pytest.mark.parametrize("case", CASES)
def test_reload_without_plugin_reproduces_outputs(saved, no_plugin, case):
    item = saved[case]
    assert not no_plugin["results"]["hf_rmtkd_imported"]
    result = no_plugin["results"][str(item["dir"])]
    assert result["class"].startswith("transformers_modules.") and not result["training"]
    assert result["class"].endswith(type(item["wrapper"]).__name__)
    torch.testing.assert_close(no_plugin["outputs"][case]["output"], item["reference"], atol=1e-5, rtol=0)
    assert result["num_parameters"] == item["expected_parameters"]


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_is_self_contained(saved, case):
    item = saved[case]
    config = json.loads((item["dir"] / "config.json").read_text())
    assert config["model_type"] == "rmtkd" and config["format_version"] == FORMAT_VERSION
    assert {"AutoConfig", "AutoModel", item["auto_class"]} <= set(config["auto_map"])
    assert not list(item["dir"].glob("*.bin")) and (item["dir"] / "model.safetensors").exists()
    allowed = {"torch", "transformers"} | set(sys.stdlib_module_names)
    for code in ("configuration_rmtkd.py", "modeling_rmtkd.py", "layers_rmtkd.py"):
        tree = ast.parse((item["dir"] / code).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert {alias.name.split(".")[0] for alias in node.names} <= allowed, code
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in allowed, code


def test_generate_matches_greedy_output_before_save(saved, no_plugin):
    for case in ("llama-causal", "llama-causal-tied"):
        item = saved[case]
        prompt = {"input_ids": item["inputs"]["input_ids"][:2], "attention_mask": item["inputs"]["attention_mask"][:2]}
        before = item["wrapper"].generate(**prompt, max_new_tokens=6, do_sample=False)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(item["dir"])
        assert torch.equal(loaded.generate(**prompt, max_new_tokens=6, do_sample=False), before)
        assert torch.equal(no_plugin["outputs"][case]["generated"], before)
        # With the KV cache, step by step, the first new token is the argmax of the full forward pass.
        assert torch.equal(before[:, prompt["input_ids"].shape[1]], item["reference"][:2, -1].argmax(-1))


def test_pipeline_text_classification(saved, tmp_path):
    directory = tmp_path / "bert"
    shutil.copytree(saved["bert-seqcls"]["dir"], directory)
    words = "the a movie film was is good bad great awful fun boring plot acting very not".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    vocab_ids = {token: i for i, token in enumerate((tmp_path / "vocab.txt").read_text().split())}
    transformers.BertTokenizerFast(vocab=vocab_ids).save_pretrained(directory)
    classifier = transformers.pipeline("text-classification", model=str(directory))
    assert isinstance(classifier.model, RMTKDForSequenceClassification)
    predictions = classifier(["the movie was great", "not a good plot"])
    assert [p["label"] in {"negative", "neutral", "positive"} for p in predictions] == [True, True]


def test_parameter_counts_follow_the_reduced_shapes(saved):
    item = saved["bert-seqcls"]
    query = item["wrapper"].model.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert isinstance(query, LowRankLinear)
    assert sum(p.numel() for p in query.parameters()) == low_rank_parameters(32, 32, 8) == 8 * (32 + 32) + 32
    before = tiny_model("bert", "sequence_classification").num_parameters()
    assert item["wrapper"].num_parameters() == item["expected_parameters"] < before


@pytest.mark.parametrize("case", ["bert-seqcls", "resnet-imgcls", "llama-causal"])
def test_one_optimizer_step_changes_every_trainable_tensor(case):
    arch, head, overrides, sites = CASES[case]
    model, inputs, reductions, _ = reduce_model(arch, head, overrides, sites)
    # ResNet keeps frozen BatchNorm statistics (eval mode): a batch-statistics BatchNorm cancels any constant its
    # input conv adds, so the centring bias of a low-rank conv feeding it would get an exactly zero gradient.
    wrapper = rmtkd_class_for(model).from_base(model, reductions).train(arch != "resnet")
    labels = inputs["input_ids"] if arch == "llama" else torch.arange(16) % 3
    before = {name: p.detach().clone() for name, p in wrapper.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    wrapper(**inputs, labels=labels).loss.backward()
    optimizer.step()
    unchanged = [name for name, p in wrapper.named_parameters() if p.requires_grad and torch.equal(p, before[name])]
    # A key bias adds q·b to every score of a query's row, which softmax ignores: its gradient is zero in exact
    # arithmetic, and only rounding ever moves it.
    assert not [name for name in unchanged if not name.endswith("attention.self.key.up.bias")]


@pytest.mark.parametrize("case", STOCK_CASES)
def test_stock_export_loads_with_plain_transformers(stock_exports, no_plugin, case):
    item = stock_exports[case]
    config = json.loads((item["dir"] / "config.json").read_text())
    assert config["model_type"] == case and "auto_map" not in config and config[item["width_field"]] == 24
    assert not list(item["dir"].glob("*.py"))
    assert no_plugin["results"][str(item["dir"])]["class"].startswith(f"transformers.models.{case}.")
    torch.testing.assert_close(no_plugin["outputs"][f"stock-{case}"]["output"], item["reference"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "case,reason",
    [
        ("low_rank", "low_rank reductions"),
        ("non-uniform", "FFN widths differ"),
        ("partial", "not every FFN was cut"),
        ("resnet", "no known single FFN-width config field"),
    ],
)
def test_stock_export_refuses_what_stock_configs_cannot_express(case, reason, tmp_path):
    arch, head = ("resnet", "image_classification") if case == "resnet" else ("bert", "sequence_classification")
    sites = {
        "low_rank": [("ffn_width", 0, 24), ("ffn_width", 1, 24), ("low_rank", "bert.pooler.dense", 8)],
        "non-uniform": [("ffn_width", 0, 24), ("ffn_width", 1, 40)],
        "partial": [("ffn_width", 0, 24)],
        "resnet": [("ffn_width", i, 4) for i in range(4)],
    }[case]
    model, _, reductions, _ = reduce_model(arch, head, {}, sites)
    wrapper = rmtkd_class_for(model).from_base(model, reductions)
    assert not can_export_stock(wrapper)
    with pytest.raises(ValueError, match=reason):
        export_stock(wrapper, tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Load-time errors name the thing at fault.


def edited_copy(saved, tmp_path, case="bert-seqcls", **config_changes) -> Path:
    directory = tmp_path / case
    shutil.copytree(saved[case]["dir"], directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(config_changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_map_naming_a_missing_module_fails_with_the_path(saved, tmp_path):
    reductions = dict(saved["bert-seqcls"]["wrapper"].config.reductions)
    reductions["bert.encoder.layer.7.output.dense"] = {"kind": "low_rank", "rank": 4}
    directory = edited_copy(saved, tmp_path, reductions=reductions)
    for error in (KeyError, ValueError):
        with pytest.raises(error, match="bert.encoder.layer.7.output.dense"):
            transformers.AutoModelForSequenceClassification.from_pretrained(directory)


def test_a_misshaped_tensor_fails_with_its_name(saved, tmp_path):
    directory = edited_copy(saved, tmp_path)
    name = "model.bert.encoder.layer.0.attention.self.query.down.weight"
    tensors = load_file(directory / "model.safetensors")
    tensors[name] = torch.zeros(6, 32)  # the config says rank 8
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        transformers.AutoModelForSequenceClassification.from_pretrained(directory)


def test_a_newer_format_version_is_refused(saved, tmp_path):
    newer = FORMAT_VERSION + 1
    directory = edited_copy(saved, tmp_path, format_version=newer)
    with pytest.raises(ValueError, match=f"format_version={newer}"):
        transformers.AutoConfig.from_pretrained(directory)
    with pytest.raises(ValueError, match="format_version"):
        transformers.AutoModelForSequenceClassification.from_pretrained(directory)


def test_a_version_1_checkpoint_still_loads(saved, tmp_path):
    # Version 1 had no shared projections; a map without them means the same under version 2.
    directory = edited_copy(saved, tmp_path, case="bert-base", format_version=1)
    reloaded = transformers.AutoModel.from_pretrained(directory).eval()
    assert reloaded.config.format_version == 1
    torch.testing.assert_close(output_of(reloaded, saved["bert-base"]["inputs"]), saved["bert-base"]["reference"])


def test_loading_a_head_checkpoint_with_another_auto_class_says_which_to_use(saved):
    with pytest.raises(ModulePathError, match="RMTKDForSequenceClassification"):
        transformers.AutoModel.from_pretrained(saved["bert-seqcls"]["dir"])


def test_from_base_refuses_a_map_the_model_does_not_match():
    model = tiny_model("bert")
    apply_low_rank(model, "bert.encoder.layer.0.attention.self.query", torch.eye(32)[:8].double())
    with pytest.raises(ValueError, match="bert.encoder.layer.0.attention.self.query"):
        RMTKDForSequenceClassification.from_base(model, {})  # the map forgets the cut


def test_config_mirrors_labels_and_rebuilds_the_base_config(saved):
    config = saved["bert-seqcls"]["wrapper"].config
    assert isinstance(config, RMTKDConfig) and config.num_labels == 3 and config.id2label[2] == "positive"
    base = config.base_model_config()
    assert (
        isinstance(base, transformers.BertConfig) and base.intermediate_size == 64 and base.id2label[2] == "positive"
    )
    assert isinstance(saved["bert-seqcls"]["wrapper"], RMTKDPreTrainedModel)


@pytest.mark.parametrize(
    "case,head,embedding",
    [
        ("llama-causal-tied", "model.lm_head", "model.model.embed_tokens"),
        ("bert-mlm-tied", "model.cls.predictions.decoder", "model.bert.embeddings.word_embeddings"),
    ],
)
def test_tied_weights_stay_tied_after_reload(saved, case, head, embedding):
    item = saved[case]
    model = getattr(transformers, item["auto_class"]).from_pretrained(item["dir"])
    assert model.all_tied_weights_keys[f"{head}.weight"] == f"{embedding}.weight"  # 5.x: target -> source
    assert model.get_submodule(head).weight is model.get_submodule(embedding).weight
