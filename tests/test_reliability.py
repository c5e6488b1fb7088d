"""Bad input at every public entry point, safe loading, and determinism.

Each bad input must raise a specific exception whose message names the thing at fault, and must leave no
half-written output behind.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_trainer import accuracy, text_task
from tiny_models import tiny_inputs, tiny_model
from transformers import AutoModelForSequenceClassification

import hf_rmtkd
from hf_rmtkd import RMTKDTrainer, RMTKDTrainingArguments
from hf_rmtkd.data import load_text_dataset
from hf_rmtkd.errors import CheckpointMismatchError, ModulePathError, NonFiniteActivationError
from hf_rmtkd.modeling import RMTKDConfig

SRC = Path(hf_rmtkd.__file__).parent


def batches(arch="bert", n=3):
    return [tiny_inputs(arch, batch=8, seq_len=12, seed=s) for s in range(n)]


def nan_images():
    images = tiny_inputs("resnet")
    images["pixel_values"][0, 0, 0, 0] = float("nan")
    return [images]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved compressed tiny BERT."""
    path = tmp_path_factory.mktemp("ckpt")
    hf_rmtkd.compress(tiny_model("bert"), batches(), min_rank=2, progress=False).save_pretrained(path)
    return path


def damaged_copy(checkpoint, tmp_path, damage):
    import shutil

    target = tmp_path / "damaged"
    shutil.copytree(checkpoint, target)
    damage(target)
    return target


def edit_tensors(edit):
    def damage(folder):
        tensors = load_file(folder / "model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    return damage


def drop_tensor(tensors):
    tensors.pop(sorted(k for k in tensors if "classifier.weight" in k)[0])


def add_tensor(tensors):
    tensors["model.bert.not_a_layer.weight"] = torch.zeros(2)


def misshape_tensor(tensors):
    name = sorted(k for k in tensors if "classifier.weight" in k)[0]
    tensors[name] = torch.zeros(7, 7)


def truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def newer_format(folder):
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(config))


def missing_module(folder):
    config = json.loads((folder / "config.json").read_text())
    config["reductions"]["bert.encoder.layer.7.output.dense"] = {"kind": "low_rank", "rank": 2}
    (folder / "config.json").write_text(json.dumps(config))


# (case id, callable, exception type, regex the message must match)
API_CASES = [
    ("empty target", lambda: hf_rmtkd.analyze(tiny_model("bert"), batches(), targets=[""], progress=False),
     ValueError, "Target ''"),
    ("unknown target", lambda: hf_rmtkd.compress(tiny_model("bert"), batches(), targets=["qkv_fused"],
                                                 progress=False), ValueError, "qkv_fused"),
    ("no targetable layer", lambda: hf_rmtkd.analyze(torch.nn.Sequential(torch.nn.ReLU()), [{"input": 1}],
                                                     progress=False), ValueError, "no site"),
    ("empty calibration data", lambda: hf_rmtkd.analyze(tiny_model("bert"), [], progress=False),
     ValueError, "No calibration data"),
    ("dataset without model inputs", lambda: hf_rmtkd.analyze(
        tiny_model("bert"), datasets.Dataset.from_dict({"text": ["a b", "c d"]}), progress=False),
     ValueError, "Tokenize"),
    ("NaN in the inputs", lambda: hf_rmtkd.analyze(tiny_model("resnet"), nan_images(), progress=False),
     NonFiniteActivationError, r"resnet\.encoder"),
    ("unknown kind", lambda: hf_rmtkd.compress(tiny_model("bert"), batches(), kinds=["prune"], progress=False),
     ValueError, "prune"),
    ("min_rank out of range", lambda: hf_rmtkd.compress(tiny_model("bert"), batches(), min_rank=0,
                                                        progress=False), ValueError, "min_rank"),
    ("quantile out of range", lambda: RMTKDTrainingArguments(output_dir="unused", spectrum_quantile=1.5),
     ValueError, "spectrum_quantile"),
    ("alpha out of range", lambda: RMTKDTrainingArguments(output_dir="unused", distillation_alpha=-0.1),
     ValueError, "distillation_alpha"),
    ("trainer without eval set", lambda: RMTKDTrainer(model=tiny_model("bert"),
                                                      args=RMTKDTrainingArguments(output_dir="unused", use_cpu=True),
                                                      train_dataset=text_task(8, 0)), ValueError, "eval_dataset"),
    ("format version too new", lambda: RMTKDConfig(base_config=tiny_model("bert").config.to_dict(),
                                                   format_version=99), ValueError, "format_version"),
]

CHECKPOINT_CASES = [
    ("missing tensor", edit_tensors(drop_tensor), CheckpointMismatchError, "missing tensors.*classifier"),
    ("extra tensor", edit_tensors(add_tensor), CheckpointMismatchError, "not_a_layer"),
    ("misshaped tensor", edit_tensors(misshape_tensor), CheckpointMismatchError, r"classifier\.weight.*\(7, 7\)"),
    ("truncated safetensors", truncate, CheckpointMismatchError, "truncated or damaged"),
    ("config from a newer format", newer_format, ValueError, "format_version"),
    ("map names a missing module", missing_module, ModulePathError, r"layer\.7\.output\.dense"),
]


@pytest.mark.parametrize("case,call,error,message", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_input_to_the_python_api(case, call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("case,damage,error,message", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoint(case, damage, error, message, checkpoint, tmp_path):
    folder = damaged_copy(checkpoint, tmp_path, damage)
    with pytest.raises(error, match=message):
        AutoModelForSequenceClassification.from_pretrained(folder)


def test_dataset_without_the_label_column_names_it(tmp_path):
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,stars\ngreat film,1\nawful,0\n")
    with pytest.raises(ValueError, match="sentiment"):
        load_text_dataset(str(csv), text_column="review", label_column="sentiment")


CLI_CASES = [
    ("missing model folder", ["analyze", "--model", "no/such/model/dir", "--dataset", "rotten_tomatoes_offline"],
     "no/such/model/dir"),
    ("quantile out of range", ["analyze", "--model", "minilm", "--dataset", "rotten_tomatoes_offline",
                               "--quantile", "2"], "quantile"),
]


@pytest.mark.parametrize("case,argv,message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_input_to_the_cli_leaves_no_output(case, argv, message, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "hf_rmtkd.cli", *argv, "--out", str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0
    assert message in done.stderr
    assert not out.exists()


def test_non_finite_loss_rolls_the_round_back(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = RMTKDTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, report_to=[], save_strategy="no",
        disable_tqdm=True, use_cpu=True, max_rounds=1, sites_per_round=2, distillation_steps_per_round=4,
        min_rank=2, learning_rate=1e30, max_grad_norm=0.0,  # an absurd step size: the loss turns non-finite
    )
    trainer = RMTKDTrainer(model=model, args=args, train_dataset=text_task(64, 0), eval_dataset=text_task(32, 1),
                           compute_metrics=accuracy)
    trainer.train()
    entry = json.loads((tmp_path / "rmtkd_log.json").read_text())[0]
    assert not entry["accepted"] and "NaN or Inf" in entry["reason"]
    restored = trainer.model.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------------------------------------------
# Safe loading


def test_nothing_is_unpickled():
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module = (getattr(node, "module", None) or "").split(".")[0]
                names = {a.name.split(".")[0] for a in node.names} | {module}
                assert not names & {"pickle", "dill", "joblib", "cloudpickle"}, f"{path} imports a pickler"
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func.value, "id", None) == "torch":
                assert any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                           for k in node.keywords), f"{path}: torch.load without weights_only=True"


def test_checkpoints_hold_no_pickle(tmp_path):
    args = RMTKDTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                                  disable_tqdm=True, max_rounds=1, sites_per_round=1, distillation_steps_per_round=1,
                                  min_rank=2, max_metric_drop=1.0)
    trainer = RMTKDTrainer(model=tiny_model("bert"), args=args, train_dataset=text_task(32, 0),
                           eval_dataset=text_task(16, 1), compute_metrics=accuracy)
    trainer.train()
    trainer.save_model()
    suffixes = {p.suffix for p in tmp_path.rglob("*") if p.is_file()}
    assert not suffixes & {".bin", ".pt", ".pth", ".pkl"}, suffixes
    assert (tmp_path / "rmtkd-round-1" / "rmtkd_state.json").exists()  # save_model() kept the round checkpoints
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "README.md").exists()


CHECKPOINT_CODE = ["configuration_rmtkd.py", "modeling_rmtkd.py", "layers_rmtkd.py"]
FORBIDDEN_CALLS = {"open", "exec", "eval", "compile", "__import__"}
FORBIDDEN_MODULES = {"os", "subprocess", "socket", "urllib", "requests", "http", "shutil", "pathlib", "pickle"}


@pytest.mark.parametrize("name", CHECKPOINT_CODE)
def test_checkpoint_code_imports_only_torch_transformers_stdlib_and_does_no_io(name):
    tree = ast.parse((SRC / "modeling" / name).read_text())
    stdlib = set(sys.stdlib_module_names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots = set() if node.level else {node.module.split(".")[0]}
        else:
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in FORBIDDEN_CALLS, f"{name} calls {node.func.id}()"
            continue
        for root in roots:
            assert root in {"torch", "transformers"} or root in stdlib, f"{name} imports {root}"
            assert root not in FORBIDDEN_MODULES, f"{name} imports {root}, which does file or network I/O"


def test_tokens_never_reach_args_dumps_logs_or_reports(tmp_path):
    secret = "hf_reliability_secret_token_42"
    args = RMTKDTrainingArguments(output_dir=str(tmp_path), hub_token=secret, use_cpu=True, report_to=[],
                                  save_strategy="no", disable_tqdm=True, max_rounds=1, sites_per_round=1,
                                  distillation_steps_per_round=1, min_rank=2, max_metric_drop=1.0)
    assert secret not in args.to_json_string() and secret not in json.dumps(args.to_dict())
    trainer = RMTKDTrainer(model=tiny_model("bert"), args=args, train_dataset=text_task(32, 0),
                           eval_dataset=text_task(16, 1), compute_metrics=accuracy)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix != ".safetensors":
            assert secret.encode() not in path.read_bytes(), path


# ------------------------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_plan_and_weights():
    results = []
    for _ in range(2):
        small = hf_rmtkd.compress(tiny_model("bert"), batches(), min_rank=2, progress=False)
        results.append((small.config.reductions, small.state_dict()))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(v, results[1][1][k]) for k, v in results[0][1].items())


def test_trainer_is_deterministic(tmp_path):
    finals = []
    for run in range(2):
        torch.manual_seed(0)
        args = RMTKDTrainingArguments(
            output_dir=str(tmp_path / str(run)), per_device_train_batch_size=16, report_to=[], save_strategy="no",
            disable_tqdm=True, use_cpu=True, max_rounds=2, sites_per_round=2, distillation_steps_per_round=3,
            min_rank=2, max_metric_drop=1.0, seed=0,
        )
        trainer = RMTKDTrainer(model=tiny_model("bert"), args=args, train_dataset=text_task(64, 0),
                               eval_dataset=text_task(32, 1), compute_metrics=accuracy)
        trainer.train()
        finals.append((trainer.model.config.reductions, trainer.model.state_dict()))
    assert finals[0][0] == finals[1][0]
    assert all(torch.equal(v, finals[1][1][k]) for k, v in finals[0][1].items())
