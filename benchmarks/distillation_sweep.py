"""Choose settings on the validation split: one RMT-KD round of the text benchmark per setting (loss, kinds).

Each setting runs the ``minilm_rt`` RMT-KD row (full-mode teacher, same cut, 300 steps, seed 0), by default with no
final phase, and records the validation accuracy after the cut, after the round and after the final phase, and how
closely the final model follows the teacher on validation (arg-max agreement, mean KL(teacher ‖ model)): smoother
readings than the accuracy of 500 examples. The test split is never touched.

Run: ``python benchmarks/distillation_sweep.py --alpha 0.7 --hidden-weight 0 [--mask-prob 0] [--copy-tokens mask]
[--mixup 0]
[--final-steps 0] [--sites-per-round 64] [--keep-only embedding|encoder]
[--threads 1] [--kinds ffn_width low_rank embedding attention_heads] [--target 0.2] [--embedding-vocabulary all]
[--learning-rate 2e-4] [--head-fraction 0.6]``;
each run appends one line to ``benchmarks/results/distillation_sweep.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from harness import predict_logits, run_rmtkd
from text import FULL, LEARNING_RATE, TARGET_PARAMS, _rmtkd_args, calibration_set, load_data, load_teacher
from transformers import AutoTokenizer, DataCollatorWithPadding

from hf_rmtkd import RMTKDTrainer
from hf_rmtkd.data import minilm_path
from hf_rmtkd.plan import Plan

RESULTS = Path(__file__).resolve().parent / "results" / "distillation_sweep.jsonl"


def _heads_kept(entry: dict) -> dict:
    """Per attention output cut by ``attention_heads``: the kept width (heads × head size)."""
    return {site: cut["k"] for site, cut in entry["sites"].items() if cut["kind"] == "attention_heads"}


class PartialCutTrainer(RMTKDTrainer):
    """An `RMTKDTrainer` that makes only the embedding's, or only the encoder's, cuts of each planned round: the
    ranks are those of the whole plan, so one run per part shows what each part of the cut costs."""

    def __init__(self, *args, keep_only: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_only = keep_only

    def _plan(self, measurements, excluded, needed):
        plan, measurements = super()._plan(measurements, excluded, needed)
        kept = [cut for cut in plan.cuts if (cut.kind == "embedding") == (self.keep_only == "embedding")]
        return Plan(kept, plan.skipped), measurements


def teacher_agreement(model, teacher, dataset, collator) -> dict:
    """How closely ``model`` follows ``teacher`` on ``dataset``: arg-max agreement and mean KL(teacher ‖ model)."""
    logits, _ = predict_logits(model, dataset, collator=collator)
    reference, _ = predict_logits(teacher, dataset, collator=collator)
    log_p, log_q = (torch.log_softmax(torch.as_tensor(x, dtype=torch.float64), -1) for x in (reference, logits))
    return {"validation_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
            "validation_kl_to_teacher": float((log_p.exp() * (log_p - log_q)).sum(-1).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--hidden-weight", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--mask-prob", type=float, default=0.0, help="distillation_mask_prob (masked-copy KD)")
    parser.add_argument("--copy-tokens", default="mask", choices=["mask", "neighbours"],
                        help="distillation_copy_tokens")
    parser.add_argument("--mixup", type=float, default=0.0, help="distillation_mixup (MixKD: Beta(c, c) blends)")
    parser.add_argument("--sites-per-round", type=int, default=FULL.sites_per_round)
    parser.add_argument("--keep-only", choices=["embedding", "encoder"], default=None,
                        help="where the accuracy goes: make only these cuts of the planned round, then stop")
    parser.add_argument("--steps", type=int, default=FULL.steps_per_round)
    parser.add_argument("--final-steps", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=None, help="reduction kinds (default: the library's)")
    parser.add_argument("--target", type=float, default=TARGET_PARAMS, help="target_params (a fraction)")
    parser.add_argument("--embedding-vocabulary", default="all", choices=["all", "train"])
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE)
    parser.add_argument("--head-fraction", type=float, default=None,
                        help="head_signal_fraction (default: the round's own signal fraction)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    budget = replace(FULL, steps_per_round=options.steps, final_steps=options.final_steps,
                     sites_per_round=options.sites_per_round)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_data(tokenizer, budget)
    teacher, _ = load_teacher(data, tokenizer, budget)
    calibration = calibration_set(data, budget)
    args = _rmtkd_args(budget, options.seed, loss={"distillation_alpha": options.alpha,
                                                   "distillation_hidden_weight": options.hidden_weight,
                                                   "distillation_temperature": options.temperature,
                                                   "distillation_mask_prob": options.mask_prob,
                                                   "distillation_copy_tokens": options.copy_tokens,
                                                   "distillation_mixup": options.mixup},
                        kinds=options.kinds, target=options.target, vocabulary=options.embedding_vocabulary,
                        learning_rate=options.learning_rate, head_fraction=options.head_fraction)
    trainer_class = RMTKDTrainer
    if options.keep_only:
        args.max_rounds = 1  # one partial round; the target is not met, and a second round would plan again
        trainer_class = partial(PartialCutTrainer, keep_only=options.keep_only)
    start = time.perf_counter()
    model, info = run_rmtkd(teacher, args, train=data["train"], validation=data["validation"],
                            calibration=calibration, collator=DataCollatorWithPadding(tokenizer),
                            trainer_class=trainer_class)
    seconds = round(time.perf_counter() - start, 1)
    entry = info["log"][0]
    record = {"alpha": options.alpha, "hidden_weight": options.hidden_weight, "temperature": options.temperature,
              "mask_prob": options.mask_prob, "copy_tokens": options.copy_tokens, "mixup": options.mixup,
              "target": options.target,
              "sites_per_round": options.sites_per_round, "keep_only": options.keep_only,
              "embedding_vocabulary": options.embedding_vocabulary, "steps": options.steps, "seed": options.seed,
              "threads": options.threads, "learning_rate": options.learning_rate,
              "head_fraction": options.head_fraction,
              "kinds": args.reduction_kinds, "attention_heads_kept": _heads_kept(entry),
              "params": model.num_parameters(), "eval_accuracy_after_cut": entry["eval_accuracy_after_cut"],
              "eval_accuracy": entry["eval_accuracy"], "accepted": entry["accepted"],
              "rounds": [{key: e[key] for key in ("params_after_cut", "eval_accuracy_after_cut", "eval_accuracy",
                                                  "accepted")} for e in info["log"]],
              "final_steps": options.final_steps, "final_distillation": info["final_distillation"],
              **teacher_agreement(model, teacher, data["validation"], DataCollatorWithPadding(tokenizer)),
              "seconds": seconds}
    print(json.dumps(record), flush=True)
    with RESULTS.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
