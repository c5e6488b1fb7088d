"""RMTKDTrainer end to end on tiny BERT, ResNet and LLaMA configs with learnable synthetic tasks."""

import copy
import json

import datasets
import numpy as np
import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    Trainer,
    TrainingArguments,
)

import hf_rmtkd  # noqa: F401  (registers the Auto classes)
from hf_rmtkd.trainer import RMTKDTrainer
from hf_rmtkd.training_args import RMTKDTrainingArguments


def accuracy(eval_pred):
    return {"accuracy": float((np.argmax(eval_pred.predictions, -1) == eval_pred.label_ids).mean())}


def text_task(n, seed):
    """Label = which third of the vocabulary the first token falls in: learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, 12), generator=g)
    labels = ((ids[:, 0] - 3) * 3 // 125).clamp(max=2)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": labels.tolist()})


def image_task(n, seed):
    """Label = the brightest of three horizontal bands."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    for i, label in enumerate(labels):
        x[i, :, 5 * label : 5 * label + 5] += 1.5
    return datasets.Dataset.from_dict({"pixel_values": x.tolist(), "labels": labels.tolist()})


def lm_task(n, seed):
    """Sequences that count up by a fixed step: the next token is predictable."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(3, 60, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + step * torch.arange(12)).clamp(max=127)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": ids.tolist()})


CASES = {
    "bert": (lambda: tiny_model("bert", initializer_range=0.1), text_task, accuracy,
             AutoModelForSequenceClassification),
    "resnet": (lambda: tiny_model("resnet"), image_task, accuracy, AutoModelForImageClassification),
    "llama": (lambda: tiny_model("llama"), lm_task, None, AutoModelForCausalLM),
}


def common_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=32, per_device_eval_batch_size=64,
                  learning_rate=3e-3, report_to=[], save_strategy="no", logging_steps=1000, seed=0,
                  disable_tqdm=True, use_cpu=True)
    values.update(overrides)
    return values


def teacher_for(case, tmp_path):
    build, task, metrics, _ = CASES[case]
    model = build().train()
    train = task(512, 0)
    Trainer(model=model, args=TrainingArguments(**common_args(tmp_path / "teacher", num_train_epochs=6)),
            train_dataset=train).train()
    return model, train, task(256, 1), metrics


def assert_reloads_the_same(trainer, directory, test, auto_class=AutoModelForSequenceClassification):
    """The trainer's saved model reloads with ``from_pretrained`` and predicts what the trained model predicts."""
    trainer.save_model(str(directory))
    reloaded = auto_class.from_pretrained(directory).eval()
    batch = {k: torch.tensor(v) for k, v in test[:8].items() if k != "labels"}
    with torch.no_grad():
        expected = trainer.model.eval()(**batch).logits
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainer_compresses_within_allowed_drop_and_reloads(case, tmp_path):
    teacher, train, test, metrics = teacher_for(case, tmp_path)
    original = teacher.num_parameters()
    args = RMTKDTrainingArguments(
        **common_args(tmp_path / "rmtkd"), sites_per_round=3, max_rounds=3, distillation_epochs_per_round=2,
        min_rank=2, max_metric_drop=0.05 if metrics else 0.25, calibration_fraction=0.25,
    )
    trainer = RMTKDTrainer(model=teacher, args=args, train_dataset=train, eval_dataset=test,
                           compute_metrics=metrics)
    output = trainer.train()
    log = json.loads((tmp_path / "rmtkd" / "rmtkd_log.json").read_text())
    assert [entry["round"] for entry in log] == list(range(1, output.metrics["rmtkd_rounds"] + 1))
    accepted = [entry for entry in log if entry["accepted"]]
    assert accepted, log
    # Parameters fall by exactly what the accepted rounds planned.
    final = trainer.model.num_parameters()
    assert final == accepted[-1]["params"] < original
    for entry in log:
        assert entry["metric_drop"] <= args.max_metric_drop or not entry["accepted"]
    assert_reloads_the_same(trainer, tmp_path / "final", test, CASES[case][3])


def test_bf16_autocast_and_gradient_accumulation(tmp_path):
    """CPU bf16 autocast and gradient accumulation run through a round; calibration statistics stay float64."""
    teacher, train, test, metrics = teacher_for("bert", tmp_path)
    args = RMTKDTrainingArguments(
        **common_args(tmp_path / "bf16"), bf16=True, gradient_accumulation_steps=2, max_rounds=1,
        sites_per_round=2, distillation_steps_per_round=4, min_rank=2, max_metric_drop=0.2,
    )
    trainer = RMTKDTrainer(model=teacher, args=args, train_dataset=train, eval_dataset=test, compute_metrics=metrics)
    measurements = trainer._measure()
    assert all(m.statistics.sum_outer.dtype == torch.float64 for m in measurements)
    trainer.train()
    entry = trainer.rmtkd_log[0]
    assert entry["accepted"], entry
    assert trainer.model.num_parameters() == entry["params"] < entry["params_before"]


def test_peft_model_is_merged_and_lora_recovery_merges_back(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    teacher, train, test, metrics = teacher_for("bert", tmp_path)
    peft_model = get_peft_model(teacher, LoraConfig(r=2, target_modules=["query", "value"]))
    args = RMTKDTrainingArguments(
        **common_args(tmp_path / "lora"), max_rounds=1, sites_per_round=2, distillation_steps_per_round=4,
        min_rank=2, max_metric_drop=0.2, lora_recovery=True, lora_r=4,
    )
    trainer = RMTKDTrainer(model=peft_model, args=args, train_dataset=train, eval_dataset=test,
                           compute_metrics=metrics)
    assert not isinstance(trainer.model, PeftModel)  # merged before anything is measured
    trainer.train()
    assert trainer.rmtkd_log[0]["accepted"]
    names = [name for name, _ in trainer.model.named_modules()]
    assert not any("lora" in name for name in names)  # the recovery adapters were merged back
    assert_reloads_the_same(trainer, tmp_path / "final", test)


@pytest.mark.parametrize("search", ["signal_fraction", "quantile", "none"])
def test_parameter_target_is_reached_by_the_target_search(search, tmp_path):
    """Either search cuts until the plan meets the target; without one the spectrum's own cut is the most."""
    teacher, train, test, metrics = teacher_for("bert", tmp_path)
    original = teacher.num_parameters()
    args = RMTKDTrainingArguments(
        **common_args(tmp_path / "target"), sites_per_round=64, max_rounds=2, distillation_steps_per_round=2,
        min_rank=2, max_metric_drop=1.0, target_params=0.3, target_search=search,
    )
    trainer = RMTKDTrainer(model=teacher, args=args, train_dataset=train, eval_dataset=test, compute_metrics=metrics)
    trainer.train()
    first = trainer.rmtkd_log[0]
    assert (first["spectrum_quantile"] > args.spectrum_quantile) == (search == "quantile")
    assert (first["signal_fraction"] < 1) == (search == "signal_fraction")
    if search == "none":
        assert trainer.model.num_parameters() > round(0.3 * original)
    else:
        assert trainer.model.num_parameters() <= round(0.3 * original)
        assert trainer.rmtkd_stop_reason.startswith("parameter target met")


def test_attention_heads_kind_drops_heads_under_a_target_and_the_result_reloads(tmp_path):
    teacher, train, test, metrics = teacher_for("bert", tmp_path)

    def heads_args(output_dir, **extra):
        return RMTKDTrainingArguments(
            **common_args(output_dir), sites_per_round=64, max_rounds=1, distillation_steps_per_round=2,
            min_rank=2, max_metric_drop=1.0, target_params=0.25,  # reached at a signal fraction of about 0.57
            reduction_kinds=["ffn_width", "low_rank", "embedding", "attention_heads"], **extra,
        )

    uncut = copy.deepcopy(teacher)  # the trainer cuts the model it is given
    trainer = RMTKDTrainer(model=teacher, args=heads_args(tmp_path / "heads"), train_dataset=train, eval_dataset=test,
                           compute_metrics=metrics)
    trainer.train()
    entries = trainer.model.config.reductions
    heads = {path: entry for path, entry in entries.items() if entry["kind"] == "attention_heads"}
    assert heads, entries
    n_heads = teacher.config.num_attention_heads
    for entry in heads.values():
        assert 1 <= len(entry["heads"]) < n_heads and entry["width"] == len(entry["heads"]) * entry["head_dim"]
    assert trainer.model.num_parameters() <= round(0.25 * trainer.rmtkd_log[0]["params_before"])
    assert_reloads_the_same(trainer, tmp_path / "final", test)

    # A lower head fraction drops more heads at the same target; the other sites keep what they held.
    fewer = RMTKDTrainer(model=uncut, args=heads_args(tmp_path / "fewer", head_signal_fraction=0.2),
                         train_dataset=train, eval_dataset=test, compute_metrics=metrics)
    fewer.train()
    kept = [len(e["heads"]) for e in fewer.model.config.reductions.values() if e["kind"] == "attention_heads"]
    assert sum(kept) + n_heads * (len(heads) - len(kept)) < sum(len(e["heads"]) for e in heads.values())
    assert fewer.model.num_parameters() <= round(0.25 * fewer.rmtkd_log[0]["params_before"])
    fewer.save_model(str(tmp_path / "fewer_final"))
    assert "signal fraction the kept attention heads hold (below the sites' own: fewer heads) | 0.2" in (
        tmp_path / "fewer_final" / "README.md").read_text()


def _calibrated_tiny_bert():
    from hf_rmtkd.calibration import calibrate

    model = tiny_model("bert").eval()
    data = [{k: torch.tensor(v) for k, v in text_task(64, 0)[i * 32:(i + 1) * 32].items() if k != "labels"}
            for i in range(2)]
    return model, calibrate(model, data, progress=False)


def test_quantile_search_returns_the_smallest_tau_that_saves_enough():
    from hf_rmtkd.calibration import recount
    from hf_rmtkd.plan import MAX_QUANTILE, plan_reductions, quantile_for_savings

    model, measurements = _calibrated_tiny_bert()

    def saved(tau):
        return plan_reductions(recount(measurements, quantile=tau), model, min_rank=2).params_saved

    at_start, at_max = saved(0.5), saved(MAX_QUANTILE)
    assert at_max > at_start  # a larger τ cuts more
    needed = (at_start + at_max) // 2
    tau = quantile_for_savings(lambda t: recount(measurements, quantile=t), model, needed, start=0.5, min_rank=2)
    assert saved(tau) >= needed > saved(tau - 1e-3)
    assert quantile_for_savings(lambda t: recount(measurements, quantile=t), model, at_start, start=0.5,
                                min_rank=2) == 0.5
    assert quantile_for_savings(lambda t: recount(measurements, quantile=t), model, at_max + 1, start=0.5,
                                min_rank=2) == MAX_QUANTILE


def test_signal_fraction_search_returns_the_largest_fraction_that_saves_enough():
    from hf_rmtkd.plan import keep_signal_fraction, plan_reductions, signal_fraction_for_savings

    model, measurements = _calibrated_tiny_bert()

    def saved(fraction):
        return plan_reductions(keep_signal_fraction(measurements, fraction), model, min_rank=2).params_saved

    at_one, at_zero = saved(1.0), saved(0.0)
    assert at_zero > at_one  # keeping less of the signal cuts more
    needed = (at_one + at_zero) // 2
    fraction = signal_fraction_for_savings(measurements, model, needed, min_rank=2)
    assert saved(fraction) >= needed > saved(fraction + 1e-3)
    assert signal_fraction_for_savings(measurements, model, at_one, min_rank=2) == 1.0
    assert signal_fraction_for_savings(measurements, model, at_zero + 1, min_rank=2) == 0.0


def test_keep_signal_fraction_never_keeps_more_than_the_outliers():
    from hf_rmtkd.plan import keep_signal_fraction

    _, measurements = _calibrated_tiny_bert()
    for fraction in (0.0, 0.3, 0.9, 1.0):
        kept = keep_signal_fraction(measurements, fraction)
        assert all(min(1, m.k) <= k.k <= m.k for m, k in zip(measurements, kept, strict=True))
    assert [m.k for m in keep_signal_fraction(measurements, 1.0)] == [m.k for m in measurements]
    assert [m.k for m in keep_signal_fraction(measurements, 0.0)] == [min(1, m.k) for m in measurements]
    with pytest.raises(ValueError, match="fraction"):
        keep_signal_fraction(measurements, 1.5)


def test_final_distillation_from_the_uncut_model(tmp_path):
    teacher, train, test, metrics = teacher_for("bert", tmp_path)
    args = RMTKDTrainingArguments(
        **common_args(tmp_path / "final"), sites_per_round=3, max_rounds=1, distillation_steps_per_round=2,
        final_distillation_steps=6, min_rank=2, max_metric_drop=1.0,
    )
    trainer = RMTKDTrainer(model=teacher, args=args, train_dataset=train, eval_dataset=test, compute_metrics=metrics)
    trainer.train()
    final = trainer.rmtkd_final
    assert final["steps"] == 6
    assert final["kept"] == (final["eval_accuracy"] >= final["eval_accuracy_before"] - 1.0)
    expected = final["eval_accuracy"] if final["kept"] else final["eval_accuracy_before"]
    assert trainer.evaluate()["eval_accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("before", "after", "kept"),
    [
        (0.788, 0.798, True),  # rose
        (0.788, 0.774, True),  # fell by 1.4 points: within max_metric_drop 0.02, validation noise
        (0.788, 0.760, False),  # fell by 2.8 points: more than max_metric_drop
        (0.788, float("nan"), False),  # a diverged run
    ],
)
def test_final_phase_tolerates_max_metric_drop(tmp_path, before, after, kept):
    teacher, train, test, metrics = teacher_for("bert", tmp_path)
    args = RMTKDTrainingArguments(**common_args(tmp_path / "guard"), final_distillation_steps=1, max_metric_drop=0.02)
    trainer = RMTKDTrainer(model=teacher, args=args, train_dataset=train, eval_dataset=test, compute_metrics=metrics)
    trainer.metric_name = "eval_accuracy"  # set by the first evaluation of a run
    assert trainer._final_phase_kept(before, after) is kept


def test_feature_distillation_adds_the_hidden_state_term(tmp_path):
    teacher, train, test, metrics = teacher_for("bert", tmp_path)
    args = RMTKDTrainingArguments(
        **common_args(tmp_path / "features"), sites_per_round=3, max_rounds=1, distillation_steps_per_round=2,
        min_rank=2, max_metric_drop=1.0, distillation_hidden_weight=1.0,
    )
    trainer = RMTKDTrainer(model=teacher, args=args, train_dataset=train, eval_dataset=test, compute_metrics=metrics)
    trainer.teacher = hf_rmtkd.distillation.teacher_copy(teacher)
    batch = {k: torch.tensor(v) for k, v in train[:8].items()}
    with torch.no_grad():
        trainer.teacher.bert.embeddings.word_embeddings.weight.mul_(2)  # a teacher whose hidden states differ
        with_features = trainer.compute_loss(teacher.train(), dict(batch))
        args.distillation_hidden_weight = 0.0
        logits_only = trainer.compute_loss(teacher, dict(batch))
    assert with_features > logits_only
    args.distillation_hidden_weight = 1.0
    trainer.teacher = None
    trainer.train()  # a whole round with the feature term runs
    assert trainer.rmtkd_log[0]["accepted"]


# The extra distillation inputs: the settings that turn each on, and the same with it off.
COPY_SETTINGS = {
    "mask": ({"distillation_mask_prob": 0.5}, {"distillation_mask_prob": 0.0}),
    "neighbours": ({"distillation_mask_prob": 0.5, "distillation_copy_tokens": "neighbours"},
                   {"distillation_mask_prob": 0.0}),
    "mixup": ({"distillation_mixup": 0.4}, {"distillation_mixup": 0.0}),
}


@pytest.mark.parametrize("copy", COPY_SETTINGS)
def test_a_copy_adds_a_teacher_term_on_changed_inputs(tmp_path, copy):
    on, off = COPY_SETTINGS[copy]
    model = tiny_model("bert", initializer_range=0.1)
    train = text_task(64, 0)
    args = RMTKDTrainingArguments(**common_args(tmp_path / copy), max_metric_drop=1.0, **on)
    trainer = RMTKDTrainer(model=model, args=args, train_dataset=train, eval_dataset=train,
                           processing_class=tiny_tokenizer(tmp_path))
    trainer.teacher = hf_rmtkd.distillation.teacher_copy(model)
    batch = {k: torch.tensor(v) for k, v in train[:8].items()}
    with torch.no_grad():
        trainer.teacher.bert.embeddings.word_embeddings.weight.mul_(2)  # a teacher whose outputs differ
        torch.manual_seed(0)
        with_copy = trainer.compute_loss(model.train(), dict(batch))
        for name, value in off.items():
            setattr(args, name, value)
        torch.manual_seed(0)  # the same dropout in the clean pass of both
        without = trainer.compute_loss(model, dict(batch))
    assert with_copy > without
    assert torch.equal(batch["input_ids"], torch.tensor(train[:8]["input_ids"]))  # the batch itself is not changed
    assert (trainer._neighbours is not None) == (copy == "neighbours")  # built from the data only if used


def test_masked_copy_without_a_tokenizer_is_refused(tmp_path):
    model = tiny_model("bert")
    train = text_task(16, 0)
    args = RMTKDTrainingArguments(**common_args(tmp_path / "no-tokenizer"), distillation_mask_prob=0.2)
    trainer = RMTKDTrainer(model=model, args=args, train_dataset=train, eval_dataset=train)
    trainer.teacher = hf_rmtkd.distillation.teacher_copy(model)
    with pytest.raises(ValueError, match="processing_class"):
        trainer.compute_loss(model.train(), {k: torch.tensor(v) for k, v in train[:4].items()})
