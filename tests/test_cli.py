"""`hf-rmtkd analyze` end to end on a tiny random BERT with a WordPiece tokenizer and a local CSV."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from hf_rmtkd.cli import main
from hf_rmtkd.report import SpectralReport

WORDS = "the a movie film good bad great awful plot actor story boring fun loved hated it was is not very".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved 2-layer BERT (d=32, FFN 64) with its tokenizer, and a 200-row CSV with columns `review,sentiment`."""
    root = tmp_path_factory.mktemp("tiny")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))  # transformers 5 ignores `vocab_file=` here
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    rows = [f"{' '.join(rng.choices(WORDS, k=rng.randint(3, 15)))},{i % 2}" for i in range(200)]
    (root / "reviews.csv").write_text("\n".join(["review,sentiment", *rows]) + "\n")
    return root


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--dataset", "--text-column", "--label-column", "--split", "--fraction",
                   "--max-length", "--batch-size", "--estimator", "--quantile", "--edge", "--no-centre", "--targets",
                   "--out"):
        assert option in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "analyze" in capsys.readouterr().out


def test_analyze_end_to_end(tiny, tmp_path):
    out = tmp_path / "analysis"
    command = [sys.executable, "-m", "hf_rmtkd.cli", "analyze", "--model", str(tiny / "model"),
               "--dataset", str(tiny / "reviews.csv"), "--text-column", "review", "--label-column", "sentiment",
               "--fraction", "0.5", "--batch-size", "16", "--no-progress", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr

    report = SpectralReport.from_json(out / "rmtkd_report.json")
    assert len(report) > 0 and report.settings["n_examples"] == 100
    assert any(site.role == "ffn_inner" and site.d == 64 for site in report)
    for site in report:
        assert site.name in result.stdout  # the table
        assert (out / "spectra" / f"{site.name}.png").is_file()
    assert (out / "spectra" / "summary.png").is_file()
    assert "rmtkd_report.json" in result.stdout


def test_analyze_targets_and_options(tiny, tmp_path, capsys):
    out = tmp_path / "ffn"
    status = main(["analyze", "--model", str(tiny / "model"), "--dataset", str(tiny / "reviews.csv"),
                   "--text-column", "review", "--max-examples", "40", "--fraction", "1.0", "--targets", "ffn_inner",
                   "--estimator", "mp_quantile", "--quantile", "0.6", "--edge", "bare", "--no-centre",
                   "--no-plots", "--no-progress", "--out", str(out)])
    assert status == 0
    report = SpectralReport.from_json(out / "rmtkd_report.json")
    assert {site.role for site in report} == {"ffn_inner"} and len(report) == 2
    assert report.settings["estimator"] == "mp_quantile" and report.settings["centre"] is False
    assert all(not site.centred and site.outliers.edge == "bare" for site in report)
    assert not (out / "spectra").exists()


def test_analyze_missing_column_is_a_one_line_error(tiny, tmp_path, capsys):
    status = main(["analyze", "--model", str(tiny / "model"), "--dataset", str(tiny / "reviews.csv"),
                   "--out", str(tmp_path)])
    assert status == 2
    error = capsys.readouterr().err
    assert "no column 'text'" in error and "'review'" in error and "--text-column" in error


@pytest.fixture(scope="module")
def tiny_classifier(tiny):
    """The tiny BERT as a 2-class sequence classifier, saved with its tokenizer."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(tiny / "model", num_labels=2)
    model.save_pretrained(tiny / "classifier")
    BertTokenizerFast.from_pretrained(tiny / "model").save_pretrained(tiny / "classifier")
    return tiny / "classifier"


def test_compress_bench_and_push_end_to_end(tiny, tiny_classifier, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    status = main(["compress", "--model", str(tiny_classifier), "--dataset", str(tiny / "reviews.csv"),
                   "--text_column", "review", "--label_column", "sentiment", "--output_dir", str(out),
                   "--max_rounds", "1", "--sites_per_round", "2", "--distillation_steps_per_round", "2",
                   "--min_rank", "2", "--max_metric_drop", "1.0", "--report_to", "none", "--save_strategy", "no",
                   "--use_cpu", "--disable_tqdm", "True", "--per_device_train_batch_size", "16"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "Parameters:" in printed and "Checkpoint:" in printed
    checkpoint = out / "compressed"
    for name in ("config.json", "model.safetensors", "modeling_rmtkd.py", "README.md", "training_args.json",
                 "tokenizer.json"):
        assert (checkpoint / name).is_file(), name

    results = tmp_path / "bench.json"
    status = main(["bench", "--original", str(tiny_classifier), "--compressed", str(checkpoint), "--runs", "3",
                   "--batch-size", "4", "--seq-len", "8", "--dataset", str(tiny / "reviews.csv"),
                   "--text-column", "review", "--label-column", "sentiment", "--out",
                   str(results)])
    assert status == 0

    bench = json.loads(results.read_text())
    assert bench["parameters"]["compressed"] < bench["parameters"]["original"]
    assert bench["flops"]["ratio"] > 1 and len(bench["speed"]) == 2 and 0 <= bench["accuracy"][1] <= 1
    assert "parameters" in capsys.readouterr().out

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return repo_id

        def upload_folder(self, *, folder_path, repo_id, **kwargs):
            uploaded.update({p.name: p.read_bytes() for p in __import__("pathlib").Path(folder_path).rglob("*")
                             if p.is_file()})
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setenv("HF_TOKEN", "hf_cli_secret_token_7")
    monkeypatch.setattr("hf_rmtkd.hub.HfApi", FakeApi)
    assert main(["push", "--checkpoint", str(checkpoint), "--repo-id", "me/tiny-rmtkd"]) == 0
    assert "README.md" in uploaded and "model.safetensors" in uploaded
    assert all(b"hf_cli_secret_token_7" not in content for content in uploaded.values())


def test_every_training_argument_is_a_compress_option(capsys):
    from dataclasses import fields

    from hf_rmtkd import RMTKDTrainingArguments

    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = capsys.readouterr().out
    for field in fields(RMTKDTrainingArguments):
        if field.init and not field.name.startswith("_"):
            assert f"--{field.name}" in text, field.name


@pytest.fixture(scope="module")
def tiny_image_task(tmp_path_factory):
    """A tiny random ResNet classifier with its image processor, and a save_to_disk dataset of 16x16 RGB images whose
    label is the brightest colour channel."""
    import datasets
    import numpy as np
    from PIL import Image
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    root = tmp_path_factory.mktemp("images")
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck",
                          num_labels=3)
    ResNetForImageClassification(config).save_pretrained(root / "classifier")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "classifier")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (96, 16, 16, 3), dtype=np.uint8)
    rows = {"image": [Image.fromarray(p) for p in pixels],
            "label": [int(p.reshape(-1, 3).mean(0).argmax()) for p in pixels]}
    data = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": data.select(range(64)), "test": data.select(range(64, 96))}).save_to_disk(
        root / "data")
    return root


def test_compress_an_image_classifier_and_fold_its_batchnorms(tiny_image_task, tmp_path, capsys):

    from transformers import AutoModelForImageClassification

    out = tmp_path / "run"
    status = main(["compress", "--model", str(tiny_image_task / "classifier"), "--dataset",
                   str(tiny_image_task / "data"), "--image_column", "image", "--fold_batchnorm", "--output_dir",
                   str(out), "--max_rounds", "1", "--sites_per_round", "2", "--distillation_steps_per_round", "2",
                   "--min_rank", "2", "--max_metric_drop", "1.0", "--report_to", "none", "--save_strategy", "no",
                   "--use_cpu", "--disable_tqdm", "True", "--per_device_train_batch_size", "16"])
    assert status == 0, capsys.readouterr().err
    checkpoint = out / "compressed"
    kinds = [entry["kind"] for entry in json.loads((checkpoint / "config.json").read_text())["reductions"].values()]
    assert kinds.count("folded_batchnorm") == 9 and "ffn_width" in kinds
    assert "BatchNorm folded into the convolution before it in 9 layers" in (checkpoint / "README.md").read_text()
    model = AutoModelForImageClassification.from_pretrained(checkpoint)
    assert not [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert model(pixel_values=torch.randn(2, 3, 16, 16)).logits.shape == (2, 3)


@pytest.mark.parametrize("flag,message", [
    ("--fold_batchnorm", "--fold_batchnorm: BertForSequenceClassification has no BatchNorm"),
    ("--fold_embeddings", "--fold_embeddings folds the embeddings into a narrowed residual stream: add residual"),
])
def test_a_fold_the_model_cannot_take_fails_before_training(tiny, tiny_classifier, tmp_path, capsys, flag, message):
    out = tmp_path / "run"
    status = main(["compress", "--model", str(tiny_classifier), "--dataset", str(tiny / "reviews.csv"),
                   "--text_column", "review", "--label_column", "sentiment", "--output_dir", str(out),
                   flag, "--report_to", "none", "--use_cpu"])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (out / "compressed").exists()


def test_compress_a_text_classifier_and_fold_its_embeddings(tiny, tiny_classifier, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    status = main(["compress", "--model", str(tiny_classifier), "--dataset", str(tiny / "reviews.csv"),
                   "--text_column", "review", "--label_column", "sentiment", "--output_dir", str(out),
                   "--reduction_kinds", "residual", "embedding", "--fold_embeddings", "--max_rounds", "1",
                   "--distillation_steps_per_round", "2", "--min_rank", "2", "--max_metric_drop", "1.0",
                   "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "True",
                   "--per_device_train_batch_size", "16"])
    assert status == 0, capsys.readouterr().err
    checkpoint = out / "compressed"
    reductions = json.loads((checkpoint / "config.json").read_text())["reductions"]
    assert reductions["bert.embeddings"]["kind"] == "folded_embeddings"
    assert "Embeddings (`bert.embeddings`) folded into the narrowed residual stream" in (
        checkpoint / "README.md").read_text()
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    assert type(model.model.bert.embeddings).__name__ == "FoldedEmbeddings"
    assert model(input_ids=torch.tensor([[2, 5, 7, 3]])).logits.shape == (1, 2)

