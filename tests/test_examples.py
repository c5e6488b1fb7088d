"""The example scripts run end to end (in a subprocess, as users run them) with tiny models and settings.

The text example gets a tiny random BERT with a character-level WordPiece vocabulary instead of MiniLM, so that the
run takes seconds; the image example gets a two-stage ResNet. Both still train a teacher, run RMT-KD rounds, save
the checkpoint and print the before/after table.
"""

import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    TrainingArguments,
)

import hf_rmtkd  # noqa: F401  (registers the Auto classes that load the compressed checkpoints)
from hf_rmtkd.data import tokenize_dataset

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# One round of two distillation steps, always accepted: the tests check the plumbing, not the compression.
TINY_RMTKD = ["--distillation-steps-per-round", "2", "--max-rounds", "1", "--sites-per-round", "2", "--min-rank",
              "2", "--max-metric-drop", "1.0", "--logging-steps", "1000", "--disable-tqdm", "true", "--bench-runs",
              "2", "--per-device-eval-batch-size", "64"]


def run_example(script: str, *args: str) -> str:
    # One thread: tiny tensors gain nothing from more, and on a shared machine OpenMP threads stall each other.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def tiny_bert(directory: Path) -> Path:
    """A random 2-layer BERT (d=32) with a character-level WordPiece tokenizer: any lowercase text tokenizes."""
    directory.mkdir(parents=True)
    characters = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *(f"##{c}" for c in characters)]
    vocab_path = directory / "vocab.txt"
    vocab_path.write_text("\n".join(vocab) + "\n")
    # transformers 5.x: `vocab=` takes the file; `vocab_file=` would be silently ignored.
    BertTokenizerFast(vocab=str(vocab_path), do_lower_case=True).save_pretrained(directory)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def test_text_classification_example(tmp_path):
    model = tiny_bert(tmp_path / "tiny-bert")
    out = tmp_path / "out"
    common = ["--model", str(model), "--output-dir", str(out), "--max-train-examples", "128",
              "--max-eval-examples", "64", "--max-length", "32", "--learning-rate", "1e-3",
              "--teacher-learning-rate", "1e-3", *TINY_RMTKD]
    stdout = run_example("text_classification.py", *common)
    assert "Teacher: fine-tuned" in stdout
    assert "| parameters |" in stdout and "accuracy, 64 held-out test examples" in stdout
    compressed = AutoModelForSequenceClassification.from_pretrained(out / "compressed")
    assert compressed.config.model_type == "rmtkd" and (out / "compressed" / "tokenizer.json").exists()
    assert (out / "compressed" / "README.md").exists() and (out / "teacher" / "teacher_settings.json").exists()


def test_cached_teacher_is_reused_only_with_the_same_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from text_classification import ScriptArguments, fine_tune_teacher

    model = tiny_bert(tmp_path / "tiny-bert")
    tokenizer = BertTokenizerFast.from_pretrained(model)
    rows = {"text": ["a good film", "a bad film"] * 8, "label": [1, 0] * 8}
    data = tokenize_dataset(DatasetDict(train=Dataset.from_dict(rows), validation=Dataset.from_dict(rows)),
                            tokenizer, max_length=16)
    args = TrainingArguments(output_dir=str(tmp_path / "args"), per_device_train_batch_size=8, report_to=[],
                             disable_tqdm=True, use_cpu=True)

    def teacher(**settings):
        fine_tune_teacher(str(model), ScriptArguments(**settings), data, ["neg", "pos"], tokenizer,
                          tmp_path / "teacher", args)
        return capsys.readouterr().out

    assert "fine-tuned" in teacher(teacher_epochs=1.0)
    assert "reusing" in teacher(teacher_epochs=1.0)
    assert "fine-tuned" in teacher(teacher_epochs=2.0)  # other settings: trained again, not a stale cache


def test_image_classification_example(tmp_path):
    out = tmp_path / "out"
    stdout = run_example(
        "image_classification.py", "--output-dir", str(out), "--max-train-examples", "128", "--max-eval-examples",
        "64", "--hidden-sizes", "32", "64", "--teacher-epochs", "1", "--per-device-train-batch-size", "32",
        *TINY_RMTKD,
    )
    assert "Teacher: trained" in stdout and "| parameters |" in stdout
    compressed = AutoModelForImageClassification.from_pretrained(out / "compressed")
    assert compressed.config.num_labels == 10


def test_accelerate_config_is_a_two_process_cpu_config():
    config = yaml.safe_load((EXAMPLES / "accelerate_config.yaml").read_text())
    assert config["distributed_type"] == "MULTI_CPU" and config["num_processes"] == 2 and config["use_cpu"]
    assert config["mixed_precision"] == "no"


@pytest.mark.slow
def test_text_classification_example_under_accelerate_launch(tmp_path):
    """Two CPU processes: the teacher trains data-parallel, RMT-KD sums covariances across them, one saves."""
    model = tiny_bert(tmp_path / "tiny-bert")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(EXAMPLES / "accelerate_config.yaml"), "--main_process_port", "0",
               str(EXAMPLES / "text_classification.py"), "--model", str(model), "--output-dir", str(out),
               "--max-train-examples", "128", "--max-eval-examples", "64", "--max-length", "32", *TINY_RMTKD]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("| parameters |") == 1  # the table comes from the main process only
    AutoModelForSequenceClassification.from_pretrained(out / "compressed")
