"""RMTKDTrainingArguments: defaults, validation of every new field, refusals, and the command line round trip."""

import dataclasses
import json

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_rmtkd.training_args import RMTKDTrainingArguments

BASE_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
NEW_FIELDS = [f for f in dataclasses.fields(RMTKDTrainingArguments) if f.name not in BASE_FIELDS]

# (field, bad value): each must raise a ValueError whose message starts with the field's name.
INVALID = [
    ("calibration_fraction", 0.0),
    ("calibration_fraction", 1.5),
    ("calibration_fraction", "0.1"),
    ("calibration_max_examples", 0),
    ("calibration_max_examples", 2.5),
    ("calibration_max_tokens", -1),
    ("calibration_centre", "yes"),
    ("effective_samples", "pixels"),
    ("spectrum_estimator", "median"),
    ("spectrum_quantile", 0.0),
    ("spectrum_quantile", 1.5),
    ("spectrum_edge", "soft"),
    ("min_rank", 0),
    ("min_rank", 2.0),
    ("rmtkd_targets", []),
    ("rmtkd_targets", [""]),
    ("reduction_kinds", []),
    ("reduction_kinds", ["pruning"]),
    ("reduction_kinds", ["low_rank", "low_rank"]),
    ("ffn_width_method", "rotate"),
    ("sites_per_round", 0),
    ("max_rounds", 0),
    ("distillation_epochs_per_round", 0.0),
    ("distillation_steps_per_round", 0),
    ("final_distillation_steps", -1),
    ("final_distillation_steps", 2.5),
    ("warmup_metric_threshold", float("nan")),
    ("warmup_max_epochs", -1.0),
    ("distillation_alpha", -0.1),
    ("distillation_alpha", 1.1),
    ("distillation_temperature", 0.0),
    ("distillation_hidden_weight", -1.0),
    ("distillation_mask_prob", 1.0),
    ("distillation_mask_prob", -0.1),
    ("distillation_copy_tokens", "synonyms"),
    ("distillation_mixup", -0.4),
    ("embedding_vocabulary", "test"),
    ("head_signal_fraction", 1.5),
    ("head_signal_fraction", "half"),
    ("target_params", 0.0),
    ("target_params", -5),
    ("target_params", 2.5),
    ("target_params", True),
    ("target_search", "sideways"),
    ("max_metric_drop", -0.01),
    ("min_keep_ratio", 1.0),
    ("min_keep_ratio", -0.1),
    ("rmtkd_metric", ""),
    ("lora_recovery", 1),
    ("lora_r", 0),
    ("lora_alpha", 0),
    ("lora_dropout", 1.0),
]


def make(tmp_path, **kwargs):
    return RMTKDTrainingArguments(output_dir=str(tmp_path), **kwargs)


def test_every_new_field_has_help_and_a_validity_case():
    assert NEW_FIELDS
    for f in NEW_FIELDS:
        assert f.metadata.get("help"), f.name
    # Every new field has at least one invalid value in the table.
    assert {f.name for f in NEW_FIELDS} == {name for name, _ in INVALID}


def test_defaults_are_valid(tmp_path):
    args = make(tmp_path)
    assert args.reduction_kinds == ["ffn_width", "low_rank", "attention_heads", "embedding"]
    assert args.rmtkd_targets is None and args.target_params is None
    assert (args.distillation_alpha, args.distillation_temperature) == (0.7, 1.0)
    assert args.param_target(1000) is None


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_value_names_the_field(tmp_path, name, value):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        make(tmp_path, **{name: value})


def test_a_head_fraction_needs_the_attention_heads_kind(tmp_path):
    with pytest.raises(ValueError, match=r"^head_signal_fraction must be None unless reduction_kinds includes"):
        make(tmp_path, head_signal_fraction=0.5, reduction_kinds=["ffn_width", "low_rank"])
    assert make(tmp_path, head_signal_fraction=0.5).head_signal_fraction == 0.5


def test_single_strings_become_lists(tmp_path):
    args = make(tmp_path, rmtkd_targets="ffn_inner", reduction_kinds=("ffn_width",))
    assert args.rmtkd_targets == ["ffn_inner"] and args.reduction_kinds == ["ffn_width"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"load_best_model_at_end": True, "eval_strategy": "steps"}, "load_best_model_at_end"),
        ({"fsdp": True}, "FSDP .* not supported yet"),
        ({"deepspeed": {"train_batch_size": 8}}, "DeepSpeed .* not supported yet"),
    ],
)
def test_refuses_unsupported_setups(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, **kwargs)


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_refuses_accelerate_configured_sharding(tmp_path, monkeypatch, variable):
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ValueError, match="not supported yet"):
        make(tmp_path)


@pytest.mark.parametrize(
    ("target", "original", "expected"),
    [(0.2, 1000, 200), (0.29, 100, 29), (0.5, 7, 4), (5000, 1000, 5000), (300.0, 1000, 300), (1, 10, 1)],
)
def test_param_target(tmp_path, target, original, expected):
    resolved = make(tmp_path, target_params=target).param_target(original)
    assert resolved == expected and isinstance(resolved, int)


def test_param_target_needs_a_count(tmp_path):
    with pytest.raises(ValueError, match="original parameter count"):
        make(tmp_path, target_params=0.5).param_target(0)


@pytest.mark.parametrize(
    ("kwargs", "metrics", "key", "greater_is_better"),
    [
        ({}, {"eval_loss": 0.4, "eval_accuracy": 0.8}, "eval_accuracy", True),
        ({}, {"eval_loss": 0.4}, "eval_loss", False),
        ({"metric_for_best_model": "f1"}, {"eval_f1": 0.7, "eval_accuracy": 0.8}, "eval_f1", True),
        ({"metric_for_best_model": "mae", "greater_is_better": False}, {"eval_mae": 0.3}, "eval_mae", False),
        ({"rmtkd_metric": "loss", "metric_for_best_model": "accuracy"}, {"eval_loss": 1, "eval_accuracy": 1},
         "eval_loss", False),
        ({"rmtkd_metric": "eval_matthews"}, {"eval_matthews": 0.5}, "eval_matthews", True),
    ],
)
def test_guarded_metric_and_direction(tmp_path, kwargs, metrics, key, greater_is_better):
    args = make(tmp_path, **kwargs)
    assert args.guarded_metric(metrics) == key
    assert args.metric_greater_is_better(key) is greater_is_better
    worse_after = 0.5 - 0.1 if greater_is_better else 0.5 + 0.1
    assert args.metric_drop(0.5, worse_after, key) == pytest.approx(0.1)


def test_guarded_metric_missing_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="rmtkd_metric"):
        make(tmp_path, rmtkd_metric="bleu").guarded_metric({"eval_loss": 0.3})


def test_to_dict_and_json(tmp_path):
    args = make(tmp_path, rmtkd_targets=["ffn_inner"], target_params=0.25)
    restored = json.loads(args.to_json_string())
    for f in NEW_FIELDS:
        assert restored[f.name] == getattr(args, f.name), f.name
    assert RMTKDTrainingArguments(**args.to_dict()).reduction_kinds == args.reduction_kinds


def test_command_line_round_trip(tmp_path):
    cli = [
        "--output_dir", str(tmp_path),
        "--calibration_fraction", "0.05",
        "--calibration_max_examples", "256",
        "--calibration_max_tokens", "20000",
        "--no_calibration_centre",
        "--effective_samples", "sequences",
        "--spectrum_estimator", "mp_quantile",
        "--spectrum_quantile", "0.3",
        "--spectrum_edge", "bare",
        "--min_rank", "4",
        "--rmtkd_targets", "ffn_inner", "*.attention.self.query",
        "--reduction_kinds", "ffn_width", "attention_heads", "embedding",
        "--head_signal_fraction", "0.6",
        "--ffn_width_method", "fold",
        "--embedding_vocabulary", "train",
        "--sites_per_round", "2",
        "--max_rounds", "6",
        "--distillation_epochs_per_round", "0.5",
        "--distillation_steps_per_round", "40",
        "--final_distillation_steps", "100",
        "--warmup_metric_threshold", "0.8",
        "--warmup_max_epochs", "2",
        "--distillation_alpha", "0.5",
        "--distillation_temperature", "1.5",
        "--distillation_hidden_weight", "0.5",
        "--distillation_mask_prob", "0.2",
        "--distillation_copy_tokens", "neighbours",
        "--distillation_mixup", "0.4",
        "--target_params", "0.2",
        "--target_search", "quantile",
        "--max_metric_drop", "0.02",
        "--min_keep_ratio", "0.1",
        "--rmtkd_metric", "f1",
        "--lora_recovery",
        "--lora_r", "4",
        "--lora_alpha", "8",
        "--lora_dropout", "0.1",
    ]  # fmt: skip
    (args,) = HfArgumentParser(RMTKDTrainingArguments).parse_args_into_dataclasses(cli)
    expected = {
        "calibration_fraction": 0.05, "calibration_max_examples": 256, "calibration_max_tokens": 20000,
        "calibration_centre": False, "effective_samples": "sequences", "spectrum_estimator": "mp_quantile",
        "spectrum_quantile": 0.3, "spectrum_edge": "bare", "min_rank": 4,
        "rmtkd_targets": ["ffn_inner", "*.attention.self.query"],
        "reduction_kinds": ["ffn_width", "attention_heads", "embedding"], "head_signal_fraction": 0.6,
        "ffn_width_method": "fold", "sites_per_round": 2, "max_rounds": 6, "distillation_epochs_per_round": 0.5,
        "distillation_steps_per_round": 40, "final_distillation_steps": 100, "warmup_metric_threshold": 0.8,
        "warmup_max_epochs": 2.0, "distillation_alpha": 0.5, "distillation_temperature": 1.5,
        "distillation_hidden_weight": 0.5, "distillation_mask_prob": 0.2,
        "distillation_copy_tokens": "neighbours", "distillation_mixup": 0.4, "target_params": 0.2,
        "target_search": "quantile", "embedding_vocabulary": "train", "max_metric_drop": 0.02,
        "min_keep_ratio": 0.1, "rmtkd_metric": "f1", "lora_recovery": True, "lora_r": 4, "lora_alpha": 8,
        "lora_dropout": 0.1,
    }  # fmt: skip
    assert set(expected) == {f.name for f in NEW_FIELDS}
    assert {name: getattr(args, name) for name in expected} == expected
    # Parsing the parsed values again (as the CLI rebuilds its dataclass) gives the same arguments.
    (again,) = HfArgumentParser(RMTKDTrainingArguments).parse_dict(args.to_dict())
    assert {name: getattr(again, name) for name in expected} == expected


def test_command_line_rejects_unknown_choice(tmp_path):
    with pytest.raises(SystemExit):
        HfArgumentParser(RMTKDTrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--reduction_kinds", "pruning"]
        )


def test_help_shows_every_help_text(monkeypatch):
    # argparse wraps help to the terminal width (and may break at hyphens); a wide one keeps each text verbatim.
    monkeypatch.setenv("COLUMNS", "10000")
    help_text = HfArgumentParser(RMTKDTrainingArguments).format_help()
    flat = " ".join(help_text.split())
    for f in NEW_FIELDS:
        assert f"--{f.name}" in help_text, f.name
        assert " ".join(f.metadata["help"].split()) in flat, f.name
