"""Benchmark ``minilm_rt``: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes, RMT-KD against baselines at matched size.

Data (`hf_rmtkd.data.load_rotten_tomatoes`: stratified 80/20 split, seed 0): 500 validation snippets are carved
from the training part (stratified, seed 0), and the teacher is fine-tuned on the first 4,096 of the rest (shuffled,
seed 0; 1 epoch, lr 1e-4, batch 32, at most 64 tokens), the recipe of ``examples/demo.py``, whose cached teacher
(``demo_out/teacher``) is reused when its recorded settings match. Validation alone accepts or rolls back RMT-KD
rounds; the test split (its first 1,000 snippets in quick mode, all 2,551 in full mode) is only measured.

Rows: the teacher; RMT-KD (`RMTKDTrainer`, library defaults for every spectral setting: τ = 0.5, ``mp_fit``,
Tracy-Widom edge, centred, min_rank 8, α = 0.7, T = 1, max_metric_drop 0.01; the schedule below); the same rounds
with no distillation; truncated weight SVD at one rank, activation PCA at one energy threshold and layer dropping,
each sized to RMT-KD's total parameter count and distilled with RMT-KD's loss for as many steps as RMT-KD trained;
and a τ sweep.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from baselines import (
    distil,
    layer_drop,
    layer_drop_params,
    match_parameter,
    pca_energy,
    pca_energy_params,
    rmtkd_without_distillation,
    svd_uniform,
    svd_uniform_params,
)
from harness import environment, evaluate_accuracy, finish_row, run_rmtkd
from measure import checkpoint_bytes, embedding_parameters
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_rmtkd
from hf_rmtkd.architectures import find_sites
from hf_rmtkd.bench import example_inputs, parameter_count
from hf_rmtkd.calibration import collect_statistics, measure_sites
from hf_rmtkd.data import load_rotten_tomatoes, minilm_path, tokenize_dataset

__all__ = ["FULL", "QUICK", "TextBudget", "run_minilm_rt"]

HERE = Path(__file__).resolve().parent
DEMO_TEACHER = HERE.parent / "demo_out" / "teacher"
CACHED_TEACHER = HERE / ".cache" / "minilm_rt_teacher_carved"
TEACHER_SETTINGS = {"train_examples": 4096, "epochs": 1.0, "learning_rate": 1e-4, "batch_size": 32, "seed": 0}
MAX_LENGTH = 64
KINDS = ["ffn_width", "low_rank", "embedding"]
MIN_RANK = 8  # the library default
MATCH_TOLERANCE = 0.03


@dataclass(frozen=True)
class TextBudget:
    """How much work a mode does (quick: one seed, subsets, short schedules, fewer timed runs)."""

    test_examples: int | None  # None: the whole test split
    sites_per_round: int
    steps_per_round: int
    max_rounds: int
    tau_with_trainer: bool  # full: each τ is a full RMT-KD run; quick: one-shot cut + `tau_steps` of distillation
    tau_steps: int
    runs_b32: int
    runs_b1: int
    seeds: tuple[int, ...]
    validation_examples: int = 500
    calibration_examples: int = 256


QUICK = TextBudget(test_examples=1000, sites_per_round=8, steps_per_round=25, max_rounds=4, tau_with_trainer=False,
                   tau_steps=40, runs_b32=10, runs_b1=20, seeds=(0,))
FULL = TextBudget(test_examples=None, sites_per_round=4, steps_per_round=60, max_rounds=10, tau_with_trainer=True,
                  tau_steps=0, runs_b32=50, runs_b1=100, seeds=(0, 1, 2))


def load_data(tokenizer, budget: TextBudget) -> dict:
    """Tokenized ``train`` (4,096, the teacher's), ``validation`` (carved from train) and ``test`` splits."""
    raw = load_rotten_tomatoes()
    carve = raw["train"].train_test_split(test_size=budget.validation_examples, seed=0, stratify_by_column="label")
    test = raw["test"] if budget.test_examples is None else raw["test"].select(range(budget.test_examples))
    splits = {"train": carve["train"].shuffle(seed=0).select(range(TEACHER_SETTINGS["train_examples"])),
              "validation": carve["test"], "test": test}
    return {name: tokenize_dataset(split, tokenizer, max_length=MAX_LENGTH) for name, split in splits.items()}


def _settings_match(directory: Path) -> bool:
    recorded = directory / "teacher_settings.json"
    if not (directory / "config.json").exists() or not recorded.exists():
        return False
    settings = json.loads(recorded.read_text())
    same_model = Path(settings.get("model", "")).resolve() == Path(minilm_path()).resolve()
    return same_model and all(settings.get(key) == value for key, value in TEACHER_SETTINGS.items())


def load_teacher(data: dict, tokenizer) -> tuple[object, str]:
    """The fine-tuned teacher: the demo's cached one or ours when their settings match, else fine-tuned now."""
    for directory in (DEMO_TEACHER, CACHED_TEACHER):
        if _settings_match(directory):
            source = directory.relative_to(HERE.parent).as_posix()
            return AutoModelForSequenceClassification.from_pretrained(directory), f"reused {source}"
    set_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench-teacher-"), num_train_epochs=1,
                             learning_rate=TEACHER_SETTINGS["learning_rate"], per_device_train_batch_size=32,
                             warmup_steps=0.1, seed=0, save_strategy="no", report_to=[], disable_tqdm=True,
                             use_cpu=True)
    Trainer(model=model, args=args, train_dataset=data["train"], processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer)).train()
    model.save_pretrained(CACHED_TEACHER)
    tokenizer.save_pretrained(CACHED_TEACHER)
    (CACHED_TEACHER / "teacher_settings.json").write_text(json.dumps({"model": minilm_path(), **TEACHER_SETTINGS}))
    return model, f"fine-tuned now, cached in {CACHED_TEACHER.relative_to(HERE.parent).as_posix()}"


def _rmtkd_args(budget: TextBudget, seed: int, quantile: float = 0.5) -> hf_rmtkd.RMTKDTrainingArguments:
    return hf_rmtkd.RMTKDTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-rmtkd-"), per_device_train_batch_size=32,
        per_device_eval_batch_size=64, learning_rate=5e-5, sites_per_round=budget.sites_per_round,
        distillation_steps_per_round=budget.steps_per_round, max_rounds=budget.max_rounds,
        spectrum_quantile=quantile, logging_steps=50, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True, seed=seed,
    )


def _kd_args(seed: int) -> TrainingArguments:
    """The baselines' distillation: RMT-KD's optimiser settings (AdamW, lr 5e-5, batch 32, linear decay)."""
    return TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench-kd-"), per_device_train_batch_size=32,
                             learning_rate=5e-5, logging_steps=50, save_strategy="no", report_to=[],
                             disable_tqdm=True, use_cpu=True, seed=seed)


def run_minilm_rt(budget: TextBudget) -> dict:
    """Run every row of the text benchmark and return the result record (see the module docstring)."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_data(tokenizer, budget)
    collator = DataCollatorWithPadding(tokenizer)
    teacher, teacher_source = load_teacher(data, tokenizer)
    teacher.eval()
    calibration = data["train"].shuffle(seed=0).select(range(budget.calibration_examples))

    def inputs(batch_size: int, seq_len: int) -> dict:
        return example_inputs(teacher, batch_size, seq_len)

    def row(name, compress, notes, extra=None):
        return finish_row(name, teacher, compress, test=data["test"], collator=collator, inputs=inputs,
                          seq_len=MAX_LENGTH, runs_b32=budget.runs_b32, runs_b1=budget.runs_b1, notes=notes,
                          extra=extra)

    rows: dict[str, dict] = {}
    teacher_params = parameter_count(teacher)
    rows["teacher"] = {"accuracy": evaluate_accuracy(teacher, data["test"], collator=collator),
                       "validation_accuracy": evaluate_accuracy(teacher, data["validation"], collator=collator),
                       "params": teacher_params,
                       "non_embedding_params": teacher_params - embedding_parameters(teacher),
                       "safetensors_bytes": checkpoint_bytes(teacher),
                       "notes": teacher_source}
    print(f"[teacher] accuracy {rows['teacher']['accuracy']:.4f}, params {teacher_params:,}", flush=True)

    # RMT-KD, one run per seed; the first seed's model is the one measured for size and speed.
    seed_accuracies = []
    rmtkd_info = None
    for seed in budget.seeds:
        set_seed(seed)
        model, result = row(f"rmtkd seed {seed}", lambda s=seed: run_rmtkd(
            teacher, _rmtkd_args(budget, s), train=data["train"], validation=data["validation"],
            calibration=calibration, collator=collator), "RMTKDTrainer, library defaults, schedule of the budget")
        seed_accuracies.append(result["accuracy"])
        if rmtkd_info is None:
            rows["rmtkd"], rmtkd_info = result, result
        del model
    rows["rmtkd"]["seed_accuracies"] = seed_accuracies
    target, steps = rmtkd_info["params"], rmtkd_info["distillation_steps"]

    def matched(extra: dict, params: int) -> dict:
        deviation = params / target - 1
        return {**extra, "param_deviation_from_rmtkd": deviation, "matched": abs(deviation) <= MATCH_TOLERANCE,
                "distillation_steps": steps}

    # Ablation: the same round structure, no distillation.
    calibration_inputs = calibration.remove_columns("labels")
    rows["rmtkd_no_distillation"] = row("rmtkd_no_distillation", lambda: rmtkd_without_distillation(
        teacher, calibration_inputs, rounds=rmtkd_info["accepted_rounds"], sites_per_round=budget.sites_per_round,
        kinds=KINDS, min_rank=MIN_RANK, exclude=rmtkd_info["rolled_back_sites"]),
        "RMT-KD's rounds (calibrate the current model, cut the next sites), no training")[1]

    kd_args = _kd_args(budget.seeds[0])
    train = data["train"]

    # Truncated weight SVD at one rank, sized to RMT-KD's parameter count.
    rank = int(match_parameter(lambda r: svd_uniform_params(teacher, int(r)), target, 1, 384, integer=True))
    rows["svd_uniform"] = row("svd_uniform", lambda: distil(svd_uniform(teacher, rank), teacher, train, steps=steps,
                                                            args=kd_args, data_collator=collator),
                              f"every encoder Linear and the token embedding at weight-SVD rank {rank}, then KD",
                              matched({"rank": rank}, svd_uniform_params(teacher, rank)))[1]

    # Activation PCA: keep a fixed share of variance at every site, from the same calibration statistics.
    sites = find_sites(teacher)
    measurements = measure_sites(collect_statistics(teacher, calibration_inputs, sites, batch_size=64,
                                                    progress=False), sites)
    energy = match_parameter(lambda t: pca_energy_params(teacher, measurements, t, kinds=KINDS, min_rank=MIN_RANK),
                             target, 0.05, 0.99999, integer=False)
    pca_params = pca_energy_params(teacher, measurements, energy, kinds=KINDS, min_rank=MIN_RANK)
    rows["pca_energy"] = row("pca_energy", lambda: distil(
        pca_energy(teacher, measurements, energy, kinds=KINDS, min_rank=MIN_RANK), teacher, train, steps=steps,
        args=kd_args, data_collator=collator),
        f"every site cut to the fewest directions holding {energy:.4f} of its variance, then KD",
        matched({"energy_threshold": energy}, pca_params))[1]

    # Layer dropping (layers 0, 2, 4), embedding factored by SVD to the matched size.
    embedding_rank = int(match_parameter(lambda r: layer_drop_params(teacher, int(r)), target, 1, 384, integer=True))
    rows["layer_drop"] = row("layer_drop", lambda: distil(
        layer_drop(teacher, embedding_rank), teacher, train, steps=steps, args=kd_args, data_collator=collator),
        f"encoder layers 0, 2, 4 kept (DistilBERT-style init), token embedding at SVD rank {embedding_rank}, then KD",
        matched({"embedding_rank": embedding_rank}, layer_drop_params(teacher, embedding_rank)))[1]

    # τ sweep: the σ² starting quantile, the one knob of the MP edge.
    for tau in (0.3, 0.5, 0.7):
        name = f"tau_{tau}"
        if budget.tau_with_trainer:
            if tau == 0.5:
                continue  # the default RMT-KD row
            rows[name] = row(name, lambda t=tau: run_rmtkd(
                teacher, _rmtkd_args(budget, budget.seeds[0], quantile=t), train=data["train"],
                validation=data["validation"], calibration=calibration, collator=collator),
                f"RMTKDTrainer with spectrum_quantile {tau}")[1]
        else:
            rows[name] = row(name, lambda t=tau: distil(
                hf_rmtkd.compress(teacher, calibration_inputs, quantile=t, min_rank=MIN_RANK, batch_size=64,
                                  progress=False), teacher, train, steps=budget.tau_steps,
                args=kd_args, data_collator=collator),
                f"one-shot hf_rmtkd.compress (spectrum_quantile {tau}, every site at once) + {budget.tau_steps} KD "
                "steps", {"distillation_steps": budget.tau_steps})[1]

    return {
        "benchmark": "minilm_rt",
        "environment": environment(list(budget.seeds)),
        "budget": asdict(budget),
        "data": {"train": len(data["train"]), "validation": len(data["validation"]), "test": len(data["test"]),
                 "test_description": ("first 1,000 snippets of the stratified 20% test split (seed 0)"
                                      if budget.test_examples else "the whole stratified 20% test split (seed 0)"),
                 "max_length": MAX_LENGTH, "calibration_examples": budget.calibration_examples},
        "timing_input": f"random token ids, seq_len {MAX_LENGTH}, no padding; batch 32 (throughput), batch 1 "
                        "(latency); teacher and row model alternating in one process",
        "match_tolerance": MATCH_TOLERANCE,
        "rows": rows,
    }
