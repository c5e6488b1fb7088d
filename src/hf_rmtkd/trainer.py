"""`RMTKDTrainer`: the paper's loop as a `transformers.Trainer`.

One round:  calibrate → plan → snapshot the teacher → cut → distil → evaluate → accept or roll back.

Each round's distillation is a fresh ``Trainer.train()`` call on the cut model: the parameter set changed, so the
optimizer, the scheduler and the DDP wrapper are rebuilt from scratch (transformers' own loop re-prepares
everything), and the loss is ``α·CE + (1−α)·T²·KL(p_teacher ‖ p_student)`` against the frozen pre-cut model. After
every accepted round the model is saved (atomically) as an RMTKD checkpoint with the trainer's state, so a killed run
resumes at the right round with ``train(resume_from_checkpoint=True)``.

Example:
    >>> args = RMTKDTrainingArguments(output_dir="out", target_params=0.5, max_metric_drop=0.01)  # doctest: +SKIP
    >>> trainer = RMTKDTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
    ...                        compute_metrics=compute_accuracy)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> trainer.save_model("out/final")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer, set_seed
from transformers.trainer_utils import TrainOutput
from transformers.utils import logging

from .api import base_of, to_report
from .architectures import find_sites
from .calibration import collect_statistics, measure_sites, recount
from .checkpoint import save_rmtkd_checkpoint
from .cut import apply_plan
from .distillation import (
    data_token_neighbours,
    distillation_loss,
    hidden_state_loss,
    mask_tokenizer,
    masked_copy_loss,
    mixup_copy_loss,
    teacher_copy,
)
from .hub import push_model
from .modeling.modeling_rmtkd import RMTKDForCausalLM, rmtkd_class_for
from .plan import Plan, keep_signal_fraction, plan_reductions, quantile_for_savings, signal_fraction_for_savings
from .reductions import cut_residual_stream, token_ids_used
from .reductions.residual import hidden_state_coordinates, stream_widths
from .reductions.residual_channels import CHANNEL_STREAM_MODEL_TYPES
from .training_args import RMTKDTrainingArguments
from .utils import tokenizer_with, write_text_atomic

__all__ = ["RMTKDTrainer"]

logger = logging.get_logger(__name__)

STATE_FILE = "rmtkd_state.json"
COORDINATES_FILE = "stream_coordinates.safetensors"
LOG_FILE = "rmtkd_log.json"
ROUND_PREFIX = "rmtkd-round-"


def _write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


class RMTKDTrainer(Trainer):
    """A `Trainer` that compresses its model by RMT-KD rounds with self-distillation.

    Args:
        model: a trained transformers model (or a ``PeftModel``, merged before the first cut, or an RMTKD model to
            compress further).
        args: `RMTKDTrainingArguments`.
        calibration_dataset: the data to measure spectra on; default: ``args.calibration_fraction`` of
            ``train_dataset`` (a fixed, seeded subset reused every round, re-measured on the current model).
        All other arguments are those of `transformers.Trainer`. ``eval_dataset`` is required: rounds are accepted
        or rolled back on its metric.
    """

    _tag_names = ["hf_rmtkd", "rmt-kd"]
    # compute_loss divides token sums by `num_items_in_batch`, the count over the whole accumulated batch.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args: RMTKDTrainingArguments = None, *trainer_args, calibration_dataset=None,
                 **trainer_kwargs):
        if args is None or not isinstance(args, RMTKDTrainingArguments):
            raise TypeError("RMTKDTrainer needs args=RMTKDTrainingArguments(...).")
        model = self._merge_peft(model)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if self.eval_dataset is None:
            raise ValueError("RMTKDTrainer needs an eval_dataset: rounds are accepted or rolled back on its metric.")
        self.calibration_dataset = calibration_dataset
        model_type = getattr(getattr(base_of(self.model), "config", None), "model_type", None)
        if args.distillation_hidden_weight and "residual" in args.reduction_kinds \
                and model_type in CHANNEL_STREAM_MODEL_TYPES:
            raise ValueError(f"distillation_hidden_weight must be 0 when reduction_kinds holds 'residual' on a "
                             f"{model_type} model: the hidden states of a ResNet whose streams keep fewer channels "
                             "have no feature term yet.")
        # Always count the real label tokens of each accumulated batch, whatever the model's forward accepts.
        self.model_accepts_loss_kwargs = True
        self.teacher: nn.Module | None = None
        self.rmtkd_log: list[dict] = []
        self.rmtkd_report = None
        self.rmtkd_baseline: float | None = None
        self.metric_name = None
        self._nonfinite_loss = False
        self._loss_parts = {"ce": 0.0, "kl": 0.0, "n": 0}
        self._quantile = args.spectrum_quantile
        self._signal_fraction = 1.0
        self._kept_tokens: list[int] | None = None
        self._neighbours: torch.Tensor | None = None  # distillation_copy_tokens='neighbours': (V, k) token ids
        self._stream_coordinates: list | None = None  # the narrowed stream's (B, μ) per hidden state
        self.rmtkd_final: dict | None = None

    # ----------------------------------------------------------------------------------------------------------------
    # Loss
    # ----------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _merge_peft(model):
        if model is not None and hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
            logger.info("Merging the PEFT adapters into the base model before RMT-KD analyses it.")
            return model.merge_and_unload()
        return model

    @property
    def _is_causal_lm(self) -> bool:
        model = self.accelerator.unwrap_model(self.model)
        return isinstance(model, RMTKDForCausalLM) or type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``α·CE + (1−α)·T²·KL(teacher ‖ student)`` while distilling; the task loss alone otherwise (and in eval)."""
        labels = inputs.get("labels")
        features = {k: v for k, v in inputs.items() if k != "labels"}
        distilling = self.teacher is not None and model.training
        match_features = distilling and self.args.distillation_hidden_weight > 0
        if match_features:
            features["output_hidden_states"] = True
        outputs = model(**features)
        # Outside distillation (warm-up, evaluation) the loss is the task loss alone: α = 1, and the student's own
        # detached logits stand in for the teacher (a zero KL term).
        teacher_logits = outputs.logits.detach()
        if distilling:
            with torch.no_grad():
                teacher_outputs = self.teacher(**features)
            teacher_logits = teacher_outputs.logits
        loss, ce, kl = distillation_loss(
            outputs.logits, teacher_logits, labels,
            alpha=self.args.distillation_alpha if distilling else 1.0,
            temperature=self.args.distillation_temperature,
            num_items_in_batch=num_items_in_batch,
            shift_labels=self._is_causal_lm,
        )
        if distilling and self.args.distillation_mask_prob > 0:
            tokenizer = mask_tokenizer(self.processing_class, self.data_collator)
            loss = loss + (1.0 - self.args.distillation_alpha) * masked_copy_loss(
                model, self.teacher, features, tokenizer, probability=self.args.distillation_mask_prob,
                neighbours=self._token_neighbours(tokenizer), temperature=self.args.distillation_temperature,
                num_items_in_batch=num_items_in_batch, shift_labels=self._is_causal_lm)
        if distilling and self.args.distillation_mixup > 0:
            loss = loss + (1.0 - self.args.distillation_alpha) * mixup_copy_loss(
                model, self.teacher, features, concentration=self.args.distillation_mixup,
                temperature=self.args.distillation_temperature, num_items_in_batch=num_items_in_batch,
                shift_labels=self._is_causal_lm)
        if model.training and not torch.isfinite(loss.detach()).all():
            # The cut model diverged: stop this round's training now; the round is rolled back (see `train`).
            self._nonfinite_loss = True
            self.control.should_training_stop = True
        if model.training and ce is not None:
            self._loss_parts["ce"] += float(ce)
            self._loss_parts["kl"] += float(kl)
            self._loss_parts["n"] += 1
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # `num_items_in_batch` was summed over processes and DDP averages gradients: undo the average.
            loss = loss * self.accelerator.num_processes
        if match_features:
            # A per-batch mean, added after the rescaling above (DDP's average is right for it); divided by the
            # accumulation steps so the accumulated batch weighs it once.
            feature_loss = hidden_state_loss(outputs.hidden_states, teacher_outputs.hidden_states,
                                             features.get("attention_mask"), self._teacher_coordinates())
            loss = loss + self.args.distillation_hidden_weight * feature_loss / self.args.gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss

    def _teacher_coordinates(self) -> list | None:
        """How the teacher's hidden states map into the coordinates of the student's narrowed residual stream
        (`hidden_state_coordinates`); None when both streams have the same widths (after the round that cut it)."""
        widths = stream_widths(getattr(self.accelerator.unwrap_model(self.model).config, "reductions", None))
        if widths == stream_widths(getattr(self.teacher.config, "reductions", None)):
            return None
        if self._stream_coordinates is None:  # a resumed run whose round folder did not keep them
            self._stream_coordinates = self._coordinates_of(self.teacher, widths)
        return self._stream_coordinates

    def _coordinates_of(self, uncut: nn.Module, widths: dict[str, int]) -> list:
        """`hidden_state_coordinates` of the model whose stream was cut to ``widths``, on the calibration data."""
        a = self.args
        return hidden_state_coordinates(base_of(uncut), widths, self._calibration_loader(),
                                        max_tokens=a.calibration_max_tokens, accelerator=self.accelerator,
                                        progress=not a.disable_tqdm)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean CE and KL parts of the distillation loss to every training log."""
        if self._loss_parts["n"] and "loss" in logs:
            n = self._loss_parts["n"]
            logs = {**logs, "ce": round(self._loss_parts["ce"] / n, 4), "kl": round(self._loss_parts["kl"] / n, 4)}
            self._loss_parts = {"ce": 0.0, "kl": 0.0, "n": 0}
        super().log(logs, start_time)

    # ----------------------------------------------------------------------------------------------------------------
    # Rounds
    # ----------------------------------------------------------------------------------------------------------------

    def _metric(self) -> float:
        """Evaluate and return the guarded metric (`RMTKDTrainingArguments.guarded_metric`)."""
        metrics = self.evaluate()
        self.metric_name = self.args.guarded_metric(metrics)
        return float(metrics[self.metric_name])

    def _drop(self, reference: float, value: float) -> float:
        return self.args.metric_drop(reference, value, self.metric_name)

    def _calibration_loader(self):
        dataset = self.calibration_dataset
        if dataset is None:
            data = self.train_dataset
            n = len(data)
            size = max(1, int(round(self.args.calibration_fraction * n)))
            if self.args.calibration_max_examples is not None:
                size = min(size, self.args.calibration_max_examples)
            dataset = data.shuffle(seed=self.args.seed).select(range(size)) if hasattr(data, "shuffle") else data
            self.calibration_dataset = dataset
        if hasattr(dataset, "column_names"):
            dataset = self._remove_unused_columns(dataset, description="calibration")
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size,
                                             collate_fn=self.data_collator, shuffle=False)
        # Each process reads its own shard; `collect_statistics` sums the statistics across processes.
        return self.accelerator.prepare_data_loader(loader) if self.accelerator.num_processes > 1 else loader

    def _measure(self):
        base = base_of(self.model)
        sites = find_sites(base, self.args.rmtkd_targets)
        statistics = collect_statistics(
            base, self._calibration_loader(), sites, max_tokens=self.args.calibration_max_tokens,
            accelerator=self.accelerator, progress=not self.args.disable_tqdm,
        )
        return measure_sites(
            statistics, sites, centre=self.args.calibration_centre, estimator=self.args.spectrum_estimator,
            quantile=self.args.spectrum_quantile, edge=self.args.spectrum_edge,
            effective_samples=self.args.effective_samples,
        )

    def _spectrum_settings(self) -> dict:
        a = self.args
        return dict(centre=a.calibration_centre, estimator=a.spectrum_estimator, quantile=self._quantile,
                    signal_fraction=self._signal_fraction, edge=a.spectrum_edge, effective_samples=a.effective_samples,
                    min_rank=a.min_rank, ffn_method=a.ffn_width_method)

    def _count_at(self, measurements, quantile: float):
        a = self.args
        return recount(measurements, estimator=a.spectrum_estimator, quantile=quantile, edge=a.spectrum_edge,
                       effective_samples=a.effective_samples)

    def _plan(self, measurements, excluded: set[str], needed: int):
        """Plan this round's cuts; with a target still ``needed`` parameters away, first search how far to cut.

        ``args.target_search`` picks the knob: the signal fraction every site keeps, or the quantile τ.

        Returns:
            ``(plan, measurements)``, the measurements counted as the plan used them (``self._quantile``,
            ``self._signal_fraction``).
        """
        args, base = self.args, base_of(self.model)
        options = dict(kinds=args.reduction_kinds, min_rank=args.min_rank, exclude=excluded,
                       vocabulary=self._vocabulary(), head_fraction=args.head_signal_fraction)
        plan, quantile, fraction = None, args.spectrum_quantile, 1.0
        search = args.target_search if needed > 0 else "none"
        if self.accelerator.is_main_process:
            if search == "quantile":
                quantile = quantile_for_savings(lambda t: self._count_at(measurements, t), base, needed,
                                                start=args.spectrum_quantile, **options)
            elif search == "signal_fraction":
                fraction = signal_fraction_for_savings(measurements, base, needed, **options)
            measurements = self._counted(measurements, quantile, fraction)
            # With a target, the round stops adding sites once it is met (shallow sites first), not overshooting it.
            plan = plan_reductions(measurements, base, max_sites=args.sites_per_round,
                                   max_savings=needed if needed > 0 else None, **options)
        # Sync point: the plan and the knobs are decided once, on the main process, and every process installs the
        # same plan (an eigenvalue sitting at the edge could otherwise flip a rank between processes).
        if self.accelerator.num_processes > 1:
            plan, quantile, fraction = broadcast_object_list([plan, quantile, fraction], from_process=0)
            if not self.accelerator.is_main_process:
                measurements = self._counted(measurements, quantile, fraction)
        self._quantile, self._signal_fraction = quantile, fraction
        return plan, measurements

    def _vocabulary(self) -> list[int] | None:
        """The token ids an embedding cut keeps codes for (``embedding_vocabulary``), counted once; None: all."""
        if self.args.embedding_vocabulary == "all" or "embedding" not in self.args.reduction_kinds:
            return None
        if self._kept_tokens is None:
            tokenizer = tokenizer_with("all_special_ids", self.processing_class, self.data_collator)
            special = tokenizer.all_special_ids if tokenizer is not None else []
            pad = getattr(base_of(self.model).config, "pad_token_id", None)
            used = token_ids_used(self.train_dataset)
            self._kept_tokens = sorted({*used, *special, *([pad] if pad is not None else [])})
            logger.info(f"embedding_vocabulary='train': codes kept for {len(self._kept_tokens):,} tokens.")
        return self._kept_tokens

    def _token_neighbours(self, tokenizer) -> torch.Tensor | None:
        """The substitution table of ``distillation_copy_tokens='neighbours'`` (None for 'mask'), built once from the
        first teacher's input embedding over the tokens of ``train_dataset``."""
        if self.args.distillation_copy_tokens != "neighbours":
            return None
        if self._neighbours is None:
            self._neighbours = data_token_neighbours(base_of(self.teacher), self.train_dataset, tokenizer)
        return self._neighbours

    def _counted(self, measurements, quantile: float, fraction: float):
        """The measurements as a plan at ``quantile`` keeping ``fraction`` of each site's signal sees them."""
        if quantile != self.args.spectrum_quantile:
            measurements = self._count_at(measurements, quantile)
        return keep_signal_fraction(measurements, fraction)  # fraction 1 returns them unchanged

    def _stream_cut_due(self, excluded: set[str]) -> bool:
        """Narrow the residual stream now: enabled, not rolled back before, and the model has no cut yet."""
        enabled = "residual" in self.args.reduction_kinds and "residual" not in excluded
        return enabled and base_of(self.model) is self.model

    def _narrow_stream(self) -> tuple[dict, dict]:
        """Cut the residual stream of the (uncut) model to its outlier counts; the map entries and the round log's."""
        a = self.args
        return cut_residual_stream(
            self.model, self._calibration_loader(), estimator=a.spectrum_estimator, quantile=a.spectrum_quantile,
            edge=a.spectrum_edge, effective_samples=a.effective_samples, min_rank=a.min_rank,
            max_tokens=a.calibration_max_tokens, accelerator=self.accelerator, progress=not a.disable_tqdm,
        )

    def _cut(self, plan, measurements, stream_entries: dict | None = None) -> None:
        base = base_of(self.model)
        inside = apply_plan(base, plan, measurements, ffn_method=self.args.ffn_width_method)
        added = {**(stream_entries or {}), **inside}
        summary = to_report(measurements, self._spectrum_settings()).summary()
        if base is self.model:
            self.model = rmtkd_class_for(base).from_base(base, added, spectral_summary=summary)
        else:
            self.model.config.reductions = {**self.model.config.reductions, **added}
            self.model.config.spectral_summary = {**(self.model.config.spectral_summary or {}), **summary}
        self.model_wrapped = self.model

    def _restore(self, snapshot: nn.Module) -> None:
        """Roll back to the pre-cut model (the teacher snapshot), trainable again."""
        snapshot.requires_grad_(True)
        self.model = self.model_wrapped = snapshot

    def _distil(self, steps: int | None = None) -> None:
        """One round of distillation: a fresh `Trainer.train()` with a new optimizer and scheduler.

        ``steps`` overrides the per-round length (``distillation_steps_per_round`` / ``_epochs_per_round``).

        With ``lora_recovery`` the cut model is frozen and LoRA adapters on its Linear layers are trained instead
        (parameter-efficient recovery for large models), then merged back, so the round ends with a plain model.
        """
        args = self.args
        saved = (args.max_steps, args.num_train_epochs, args.save_strategy)
        if steps is not None:
            args.max_steps = steps
        elif args.distillation_steps_per_round is not None:
            args.max_steps = args.distillation_steps_per_round
        else:
            args.max_steps, args.num_train_epochs = -1, args.distillation_epochs_per_round
        # Checkpoints inside a round would hold a model mid-distillation; rounds are saved whole instead.
        args.save_strategy = "no"
        if args.lora_recovery:
            self.model = self.model_wrapped = self._with_lora(self.model)
        self.optimizer, self.lr_scheduler = None, None
        try:
            super().train()
        finally:
            args.max_steps, args.num_train_epochs, args.save_strategy = saved
            self.optimizer, self.lr_scheduler = None, None
            if args.lora_recovery:
                self.model = self.model_wrapped = self.model.merge_and_unload()

    def _with_lora(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        # Full paths, not name suffixes: after a cut, "query" may name a plain Linear in one layer and a LowRankLinear
        # (whose own factors are the Linears to adapt) in another, and PEFT refuses the latter.
        names = sorted(path for path, m in model.named_modules() if isinstance(m, nn.Linear))
        config = LoraConfig(r=self.args.lora_r, lora_alpha=self.args.lora_alpha,
                            lora_dropout=self.args.lora_dropout, target_modules=names)
        return get_peft_model(model, config)

    def _warm_up(self, metric: float) -> float:
        """Train on the task until the eval metric reaches ``warmup_metric_threshold`` (the paper's τ_val)."""
        threshold = self.args.warmup_metric_threshold
        epochs = 0.0
        while self._drop(threshold, metric) > 0 and epochs < self.args.warmup_max_epochs:
            step = min(1.0, self.args.warmup_max_epochs - epochs)
            saved = (self.args.max_steps, self.args.num_train_epochs)
            self.args.max_steps, self.args.num_train_epochs = -1, step
            self.optimizer, self.lr_scheduler = None, None
            try:
                super().train()
            finally:
                self.args.max_steps, self.args.num_train_epochs = saved
            epochs += step
            metric = self._metric()
            logger.info(f"Warm-up: {epochs:g} epochs, {self.metric_name} = {metric:.4f} (threshold {threshold}).")
        return metric

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs) -> TrainOutput:
        """Run RMT-KD rounds until a stopping rule fires; the compressed model ends up in ``self.model``.

        Stopping rules: the parameter target is met; no site shrinks any more; a site's k/d falls below
        ``min_keep_ratio``; ``max_rounds`` is reached. A round whose eval metric falls by more than
        ``max_metric_drop`` (from the metric before the first cut) is rolled back and its sites are not cut again.

        Args:
            resume_from_checkpoint: an ``rmtkd-round-N`` directory written by a previous run, or True for the latest
                one in ``output_dir``.
        """
        args = self.args
        start = time.time()
        # The final phase distils from the model as given, before any cut; a resumed run is given that model too.
        uncut = teacher_copy(self.model) if args.final_distillation_steps else None
        state = self._resume(resume_from_checkpoint) if resume_from_checkpoint else None
        if state is None:
            original = self.model.num_parameters()
            baseline = self._metric()
            if args.warmup_metric_threshold is not None:
                baseline = self._warm_up(baseline)
            state = {"round": 0, "original_params": original, "baseline": baseline, "excluded": [], "log": []}
        self.rmtkd_log = state["log"]
        self.rmtkd_baseline = state["baseline"]
        target = args.param_target(state["original_params"])
        stop_reason = "max_rounds reached"
        while args.max_rounds is None or state["round"] < args.max_rounds:
            params = self.model.num_parameters()
            if target is not None and params <= target:
                stop_reason = f"parameter target met ({params:,} <= {target:,})"
                break
            # The residual stream is narrowed once, at the start of the first round, before any cut inside the
            # layers: those are then measured and planned on the narrowed model, within the same round.
            narrows = self._stream_cut_due(set(state["excluded"]))
            snapshot = teacher_copy(self.model) if narrows else None
            stream_entries, stream_sites = self._narrow_stream() if narrows else ({}, {})
            if narrows and args.distillation_hidden_weight:  # the feature term needs the stream's coordinates
                self._stream_coordinates = self._coordinates_of(snapshot, stream_widths(stream_entries))
            measurements = self._measure()
            needed = self.model.num_parameters() - target if target is not None else 0
            if narrows and target is not None and needed <= 0:
                plan = Plan(cuts=[], skipped={})  # the narrowed stream alone meets the target
            else:
                plan, measurements = self._plan(measurements, set(state["excluded"]), needed)
            self.rmtkd_report = to_report(measurements, self._spectrum_settings())
            if not plan.cuts and not narrows:
                stop_reason = "no site shrinks any more"
                break
            thin = [c for c in plan.cuts if c.k_spectrum / c.d < args.min_keep_ratio]
            if thin:
                stop_reason = f"k/d of {thin[0].site} is {thin[0].k_spectrum / thin[0].d:.3f} < min_keep_ratio"
                if narrows:
                    self._restore(snapshot)
                break
            state["round"] += 1
            # Seed every round from its index, so a resumed run repeats the uninterrupted run's dropout and data order.
            set_seed(args.seed + state["round"])
            self.teacher = snapshot if narrows else teacher_copy(self.model)
            self._cut(plan, measurements, stream_entries)
            after_cut = self._metric()
            self._nonfinite_loss = False
            self._distil()
            metric = self._metric()
            drop = self._drop(state["baseline"], metric)
            if self._nonfinite_loss or not math.isfinite(metric):
                accepted, reason = False, "the distillation loss became NaN or Inf"
            elif drop > args.max_metric_drop + 1e-9:  # float noise: a drop of exactly the budget is allowed
                accepted = False
                reason = f"{self.metric_name} fell by {drop:.4f} > max_metric_drop {args.max_metric_drop}"
            else:
                accepted, reason = True, "within max_metric_drop"
            entry = {
                "round": state["round"],
                "sites": {**stream_sites,
                          **{c.site: {"kind": c.kind, "d": c.d, "k": c.rank, "k_spectrum": c.k_spectrum,
                                      **({"heads": c.heads} if c.heads else {}),
                                      **({"rows": len(c.tokens)} if c.tokens else {})} for c in plan.cuts}},
                "spectrum_quantile": self._quantile,
                "signal_fraction": self._signal_fraction,
                "params_before": params,
                "params_after_cut": self.model.num_parameters(),
                f"{self.metric_name}_after_cut": after_cut,
                self.metric_name: metric,
                "metric_drop": drop,
                "accepted": accepted,
                "reason": reason,
            }
            if not accepted:
                self._restore(self.teacher)
                if narrows:
                    self._stream_coordinates = None
                state["excluded"] += [c.site for c in plan.cuts] + (["residual"] if narrows else [])
                logger.warning(f"Round {state['round']} rolled back: {reason}.")
            self.teacher = None
            entry["params"] = self.model.num_parameters()
            self.rmtkd_log.append(entry)
            self.log({"rmtkd_round": state["round"], "rmtkd_params": entry["params"],
                      "rmtkd_accepted": float(accepted), self.metric_name: metric,
                      **{f"rmtkd_k/{s}": v["k"] for s, v in entry["sites"].items()}})
            self._save_round(state)
        if uncut is not None and "final" not in state and any(entry["accepted"] for entry in self.rmtkd_log):
            state["final"] = self._final_distillation(uncut, state["round"])
            self._save_round(state)
        self.rmtkd_final = state.get("final")
        final = self.model.num_parameters()
        logger.info(f"RMT-KD stopped: {stop_reason}. Parameters {state['original_params']:,} -> {final:,}.")
        self.rmtkd_stop_reason = stop_reason
        metrics = {"rmtkd_rounds": state["round"], "rmtkd_params": final,
                   "rmtkd_param_ratio": final / state["original_params"], "train_runtime": time.time() - start}
        return TrainOutput(self.state.global_step, 0.0, metrics)

    def _final_distillation(self, uncut: nn.Module, rounds: int) -> dict:
        """Distil the compressed model from the ``uncut`` one; keep the result unless it diverged or the metric fell
        by more than ``max_metric_drop`` (see `_final_phase_kept`)."""
        before = self._metric()
        snapshot = teacher_copy(self.model)
        set_seed(self.args.seed + rounds + 1)
        self.teacher, self._nonfinite_loss = uncut, False
        self._distil(self.args.final_distillation_steps)
        self.teacher = None
        after = self._metric()
        kept = not self._nonfinite_loss and self._final_phase_kept(before, after)
        if not kept:
            self._restore(snapshot)
        entry = {"steps": self.args.final_distillation_steps, f"{self.metric_name}_before": before,
                 self.metric_name: after, "kept": kept}
        self.log({"rmtkd_final_kept": float(kept), f"rmtkd_final_{self.metric_name}": after})
        logger.info(f"Final distillation from the uncut model: {self.metric_name} {before:.4f} -> {after:.4f}"
                    f" ({'kept' if kept else 'discarded'}).")
        return entry

    def _final_phase_kept(self, before: float, after: float) -> bool:
        """Whether the final phase's result replaces the model it started from.

        The final phase trains the same shapes longer, from the uncut model, so it is expected to help; what the guard
        must catch is a broken run, not the noise of a small validation set (on 500 examples a 1.4-point accuracy
        difference is under one standard error). So it tolerates the same worsening as a round, ``max_metric_drop``.
        """
        return math.isfinite(after) and self._drop(before, after) <= self.args.max_metric_drop

    # ----------------------------------------------------------------------------------------------------------------
    # Saving and resuming
    # ----------------------------------------------------------------------------------------------------------------

    def _save_round(self, state: dict) -> None:
        """Save the model and the trainer's state after a round, atomically, as ``output_dir/rmtkd-round-N``."""
        output = Path(self.args.output_dir)
        _write_json_atomic(output / LOG_FILE, self.rmtkd_log)
        if not self.args.should_save:
            return
        final = output / f"{ROUND_PREFIX}{state['round']}"
        self._write_checkpoint(final, report=None)  # no plots per round: they are for the final model
        if self._stream_coordinates is not None:  # the feature term's coordinates, for a resumed run
            save_file({f"{part}.{i}": tensor.contiguous() for i, pair in enumerate(self._stream_coordinates)
                       if pair is not None for part, tensor in zip(("basis", "mean"), pair, strict=True)},
                      str(final / COORDINATES_FILE), metadata={"hidden_states": str(len(self._stream_coordinates))})
        # The state file goes last: a round folder without it is incomplete and `resume` skips it.
        _write_json_atomic(final / STATE_FILE, state)

    def _card_kwargs(self) -> dict:
        accepted = [entry for entry in self.rmtkd_log if entry["accepted"]]
        a = self.args
        return {
            "metric_name": (self.metric_name or "accuracy").removeprefix("eval_"),
            "metric_before": self.rmtkd_baseline,
            "metric_after": accepted[-1][self.metric_name] if accepted else None,
            "settings": {**self._spectrum_settings(), "distillation_alpha": a.distillation_alpha,
                         "distillation_temperature": a.distillation_temperature,
                         "distillation_mask_prob": a.distillation_mask_prob,
                         "distillation_copy_tokens": a.distillation_copy_tokens,
                         "distillation_mixup": a.distillation_mixup,
                         "embedding_vocabulary": a.embedding_vocabulary,
                         "max_metric_drop": a.max_metric_drop, "target_params": a.target_params,
                         "sites_per_round": a.sites_per_round,
                         **({"head_signal_fraction": a.head_signal_fraction}
                            if a.head_signal_fraction is not None else {})},
        }

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model as an RMTKD checkpoint: weights, code, tokenizer, model card, spectra, report and log.

        Written to a temporary folder and renamed into place (`save_rmtkd_checkpoint`). When the target is the run's
        ``output_dir`` (which holds the round checkpoints), the finished files are moved in one by one instead, so
        nothing else there is touched. Training arguments are saved as JSON (tokens masked), never pickled.
        """
        if self.args.should_save:
            self._write_checkpoint(Path(output_dir or self.args.output_dir), report=self.rmtkd_report)

    def _write_checkpoint(self, output: Path, report) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if getattr(model.config, "model_type", None) != "rmtkd":  # nothing was cut: a plain transformers checkpoint
            super().save_model(str(output), _internal_call=True)
            (output / "training_args.bin").unlink(missing_ok=True)
            write_text_atomic(output / "training_args.json", self.args.to_json_string())
            return
        shared = output.exists() and any(p.name.startswith(ROUND_PREFIX) or p.name.startswith("checkpoint-")
                                         for p in output.iterdir())
        target = output.with_name(f".{output.name}.save-{os.getpid()}") if shared else output
        save_rmtkd_checkpoint(model, target, report=report, rmtkd_log=self.rmtkd_log or None,
                              card_kwargs=self._card_kwargs(), tokenizer=self.processing_class)
        write_text_atomic(target / "training_args.json", self.args.to_json_string())
        if shared:
            for item in target.iterdir():
                destination = output / item.name
                if destination.is_dir():
                    shutil.rmtree(destination)
                os.replace(item, destination)
            target.rmdir()

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token=None,
                    revision=None, private=None, **kwargs) -> str | None:
        """Push the compressed model with its card, spectrum plots, report and log (main process only).

        The token follows huggingface_hub's resolution (argument, ``args.hub_token``, ``HF_TOKEN``, stored login)
        and is never written to any file.
        """
        if not self.is_world_process_zero():
            return None
        model = self.accelerator.unwrap_model(self.model)
        if getattr(model.config, "model_type", None) != "rmtkd":
            return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
        return push_model(
            model, self.hub_model_id or self.args.hub_model_id, token=token or self.args.hub_token,
            private=self.args.hub_private_repo if private is None else private, revision=revision,
            commit_message=commit_message or "End of training", report=self.rmtkd_report,
            rmtkd_log=self.rmtkd_log or None, tokenizer=self.processing_class,
            card_kwargs={**self._card_kwargs(), "datasets": kwargs.get("dataset_tags")},
        )

    def _latest_round(self) -> Path | None:
        rounds = [p for p in Path(self.args.output_dir).glob(f"{ROUND_PREFIX}*") if (p / STATE_FILE).exists()]
        return max(rounds, key=lambda p: int(p.name[len(ROUND_PREFIX):]), default=None)

    def _resume(self, checkpoint: str | bool) -> dict | None:
        """Rebuild the reduced architecture from a round checkpoint's config, load its weights, return its state."""
        path = self._latest_round() if checkpoint is True else Path(checkpoint)
        if path is None:
            logger.warning(f"No {ROUND_PREFIX}N checkpoint in {self.args.output_dir}: starting from round 0.")
            return None
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"{path} is not an RMT-KD round checkpoint (no {STATE_FILE}).")
        state = json.loads((path / STATE_FILE).read_text())
        base = base_of(self.model)
        saved_type = json.loads((path / "config.json").read_text()).get("model_type")
        # A run whose cuts were all rolled back saved the plain model; otherwise rebuild the reduced architecture
        # from the checkpoint's config before its weights are loaded.
        cls = rmtkd_class_for(base) if saved_type == "rmtkd" else type(base)
        model = cls.from_pretrained(str(path))
        self.model = self.model_wrapped = model.to(self.args.device)
        if (path / COORDINATES_FILE).exists():
            with safe_open(str(path / COORDINATES_FILE), framework="pt") as saved:
                count = int(saved.metadata()["hidden_states"])
                self._stream_coordinates = [
                    (saved.get_tensor(f"basis.{i}"), saved.get_tensor(f"mean.{i}")) if f"basis.{i}" in saved.keys()
                    else None for i in range(count)]
        logger.info(f"Resumed RMT-KD at round {state['round']} from {path}.")
        return state
