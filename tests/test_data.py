"""Offline loaders (Rotten Tomatoes, MNIST-5k, digits, MiniLM), local text datasets, tokenization, the local metric."""

from pathlib import Path

import evaluate
import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict
from transformers import BertTokenizerFast, EvalPrediction

from hf_rmtkd.data import (
    calibration_subset,
    load_digits_dataset,
    load_mnist5k,
    load_text_dataset,
    minilm_path,
    tokenize_dataset,
)
from hf_rmtkd.metrics import compute_accuracy, load_metric

WORDS = "the a movie film good bad great awful plot story fun boring".split()


@pytest.fixture(scope="module")
def rotten_tomatoes():
    return load_text_dataset("rotten_tomatoes_offline")  # `load_rotten_tomatoes()` with the default split


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab=str(vocab))  # transformers 5 ignores `vocab_file=` here


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_rotten_tomatoes(rotten_tomatoes):
    assert (len(rotten_tomatoes["train"]), len(rotten_tomatoes["test"])) == (10201, 2551)
    train = rotten_tomatoes["train"]
    assert train.column_names == ["text", "label"]
    assert train.features["label"] == ClassLabel(names=["rotten", "fresh"])
    assert set(rotten_tomatoes) == {"train", "test"}
    texts = list(train["text"]) + list(rotten_tomatoes["test"]["text"])
    assert len(set(texts)) == 12752  # duplicates dropped
    share_fresh = np.mean(list(train["label"]))
    assert share_fresh == pytest.approx(np.mean(list(rotten_tomatoes["test"]["label"])), abs=0.01)  # stratified


def test_mnist5k():
    mnist = load_mnist5k().with_format("numpy")
    assert len(mnist) == 5000 and mnist.column_names == ["pixel_values", "labels"]
    pixels = mnist[:100]["pixel_values"]
    assert pixels.shape == (100, 1, 28, 28) and pixels.dtype == np.float32
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    labels = mnist[:]["labels"]
    assert np.bincount(labels).tolist() == [500] * 10
    assert len(set(labels[:50].tolist())) > 5  # shuffled: the file is sorted by class


def test_digits():
    digits = load_digits_dataset().with_format("numpy")
    assert len(digits) == 1797 and digits[:4]["pixel_values"].shape == (4, 1, 8, 8)
    assert digits[:]["pixel_values"].max() <= 1.0


def test_minilm_path():
    assert (Path(minilm_path()) / "config.json").is_file()


def test_load_text_dataset_renames_columns_and_encodes_string_labels(tmp_path):
    path = write_csv(tmp_path / "reviews.csv", "id,review,sentiment", ["1,good film,pos", "2,bad plot,neg"])
    dataset = load_text_dataset(path, text_column="review", label_column="sentiment")
    train = dataset["train"]
    assert set(train.column_names) == {"id", "text", "label"}
    assert train[:]["text"] == ["good film", "bad plot"]
    assert train.features["label"].names == ["neg", "pos"] and train[:]["label"] == [1, 0]


def test_load_text_dataset_missing_column_names_it(tmp_path):
    path = write_csv(tmp_path / "reviews.csv", "review,sentiment", ["good,1"])
    with pytest.raises(ValueError, match=r"no column 'text'.*\['review', 'sentiment'\].*text_column"):
        load_text_dataset(path)
    with pytest.raises(ValueError, match="no column 'stars'"):
        load_text_dataset(path, text_column="review", label_column="stars")


def test_load_text_dataset_unlabelled_json_lines(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "good film"}\n{"text": "bad plot"}\n')
    assert load_text_dataset(path)["train"].column_names == ["text"]


def test_load_text_dataset_from_save_to_disk(tmp_path):
    data = Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1]})
    data.save_to_disk(tmp_path / "single")
    DatasetDict({"train": data, "validation": data}).save_to_disk(tmp_path / "dict")
    assert load_text_dataset(tmp_path / "single", text_column="sentence")["train"][:]["text"] == ["a", "b"]
    assert set(load_text_dataset(tmp_path / "dict", text_column="sentence")) == {"train", "validation"}


def test_load_text_dataset_hub_name_offline_is_a_clear_error():
    with pytest.raises(ValueError, match="'glue/sst2'.*rotten_tomatoes_offline"):
        load_text_dataset("glue/sst2", text_column="sentence")


def test_tokenize_dataset(tokenizer):
    data = DatasetDict({"train": Dataset.from_dict({"text": ["the good movie " * 20, "bad"], "label": [1, 0]})})
    tokenized = tokenize_dataset(data, tokenizer, max_length=16)["train"]
    assert tokenized.column_names == ["input_ids", "token_type_ids", "attention_mask", "labels"]
    assert [len(ids) for ids in tokenized["input_ids"]] == [16, 3]  # truncated, not padded
    assert tokenized[:]["labels"] == [1, 0]
    with pytest.raises(ValueError, match="No text column 'review'"):
        tokenize_dataset(data["train"], tokenizer, text_column="review")


def test_calibration_subset(rotten_tomatoes):
    train = rotten_tomatoes["train"]
    subset = calibration_subset(train, 0.1, seed=0)
    assert len(subset) == 1021  # ceil(0.1 · 10,201)
    assert subset[:]["text"] == calibration_subset(train, 0.1, seed=0)[:]["text"]
    assert subset[:]["text"] != calibration_subset(train, 0.1, seed=1)[:]["text"]
    assert len(calibration_subset(train, 0.5, max_examples=64)) == 64
    with pytest.raises(ValueError, match="fraction"):
        calibration_subset(train, 0.0)
    with pytest.raises(ValueError, match="one split"):
        calibration_subset(rotten_tomatoes)


def test_local_accuracy_metric_offline():
    path = Path(__import__("hf_rmtkd.metrics", fromlist=["x"]).__file__).parent / "accuracy"
    metric = evaluate.load(str(path))
    assert metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0]) == {"accuracy": 0.75}
    assert load_metric().compute(predictions=[1], references=[0]) == {"accuracy": 0.0}
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert compute_accuracy(EvalPrediction(predictions=logits, label_ids=np.array([1, 1, 1]))) == pytest.approx(
        {"accuracy": 2 / 3}
    )
    with pytest.raises(ValueError, match="No local metric 'f1'"):
        load_metric("f1")
