"""`RMTKDTrainingArguments`: the `TrainingArguments` of an RMT-KD run.

The new fields come in six groups, in the order a run uses them: calibration (which data the spectra come from),
spectrum (how the Marchenko–Pastur edge is placed), schedule (which sites are cut, how many per round, how long each
round distils), distillation (the loss), stopping (when to stop cutting) and recovery (optional LoRA adapters).

Things about transformers 5.x ``TrainingArguments`` that matter here:

- ``evaluation_strategy`` is gone; the name is ``eval_strategy``. RMT-KD evaluates at every round boundary on its
  own, so ``eval_strategy`` only adds evaluations inside a round.
- ``save_strategy`` defaults to ``"steps"`` (every ``save_steps=500``). A checkpoint taken after a cut holds the
  reduced shapes, so resuming from it rebuilds the cut from its ``config.json`` before loading the weights.
- ``load_best_model_at_end`` is refused: checkpoints of different rounds have different shapes. The accept/rollback
  rule (``max_metric_drop``) keeps the best model instead.
- ``fsdp`` and ``deepspeed`` (or ``accelerate launch`` configured for them) are refused: module surgery on sharded
  parameters is not supported yet. Plain data parallel (``accelerate launch --num_processes N``) is.
- ``average_tokens_across_devices`` defaults to True: ``num_items_in_batch`` is then summed over processes, and a loss
  divided by it is multiplied by the number of processes (see `hf_rmtkd.distillation.distillation_loss`).
- ``gradient_checkpointing`` is a deprecated alias of ``activation_checkpointing``. Calibration runs in its own
  ``no_grad`` pass, so recomputed forwards never reach the covariance hooks.

Example:
    >>> args = RMTKDTrainingArguments(output_dir="out", target_params=0.5)  # doctest: +SKIP
    >>> args.param_target(22_700_000)  # doctest: +SKIP
    11350000
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .plan import DEFAULT_KINDS, KINDS
from .reductions.ffn_width import METHODS as FFN_WIDTH_METHODS
from .spectrum import EDGES, EFFECTIVE_SAMPLES, ESTIMATORS

EMBEDDING_VOCABULARIES = ("all", "train")
COPY_TOKENS = ("mask", "neighbours")

__all__ = ["RMTKDTrainingArguments"]

TARGET_SEARCHES = ("signal_fraction", "quantile", "none")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_list(value):
    # A single string (or a tuple) is a natural Python spelling of a list of one (or more) names.
    if isinstance(value, str):
        return [value]
    return list(value) if isinstance(value, tuple) else value


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class RMTKDTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the RMT-KD schedule: calibrate, cut at the Marchenko–Pastur edge, self-distil, repeat.

    Every field of `transformers.TrainingArguments` keeps its meaning; the epochs and steps of a round come from
    ``distillation_epochs_per_round`` / ``distillation_steps_per_round``. A plain
    ``RMTKDTrainingArguments(output_dir=...)`` is valid: it cuts every site of the architecture's role table, one per
    round, shallow to deep, until a round costs more than ``max_metric_drop`` or no site shrinks any more.

    The guarded metric (``rmtkd_metric`` unset) is ``metric_for_best_model`` when that is set, else ``"accuracy"``
    when the evaluation reports it, else ``"loss"``. See `guarded_metric` and `metric_drop`.

    Raises:
        ValueError: on an out-of-range or unknown value (the message names the field), and for
            ``load_best_model_at_end=True``, FSDP or DeepSpeed.
    """

    # ---- calibration: which data the covariance spectra come from ----------------------------------------------
    calibration_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of the training set drawn (with a fixed seed) as the calibration subset whose hidden "
            "activations give the covariance spectra; in (0, 1]. The same subset is reused every round, measured "
            "on the current model."
        },
    )
    calibration_max_examples: int | None = field(
        default=None,
        metadata={"help": "Cap on the number of calibration examples (None: no cap beyond calibration_fraction)."},
    )
    calibration_max_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Cap on the number of real (non-padding) calibration tokens or pixels per site; the cost of a "
            "covariance is O(n d^2). None: no cap."
        },
    )
    calibration_centre: bool = field(
        default=True,
        metadata={"help": "Subtract the mean activation before taking the covariance (the paper assumes mean zero)."},
    )
    effective_samples: str = field(
        default="tokens",
        metadata={
            "help": "Sample count n in the Marchenko-Pastur ratio q = d/n: 'tokens' (every real token or pixel) or "
            "'sequences' (one per example; tokens of a sequence are correlated, so this is the conservative count "
            "and keeps more directions).",
            "choices": list(EFFECTIVE_SAMPLES),
        },
    )

    # ---- spectrum: where the Marchenko-Pastur edge lies ---------------------------------------------------------
    spectrum_estimator: str = field(
        default="mp_fit",
        metadata={
            "help": "Noise-variance (sigma^2) estimator: 'mp_fit' (the paper's rule: start at the spectrum_quantile "
            "of the eigenvalues, refine by a least-squares fit of the MP density to their histogram) or "
            "'mp_quantile' (the spectrum_quantile eigenvalue divided by the same MP quantile; steadier on narrow "
            "layers of a few dozen channels, where the histogram holds few eigenvalues).",
            "choices": list(ESTIMATORS),
        },
    )
    spectrum_quantile: float = field(
        default=0.5,
        metadata={"help": "Quantile tau of the eigenvalues that starts the sigma^2 estimate; in (0, 1)."},
    )
    spectrum_edge: str = field(
        default="tracy_widom",
        metadata={
            "help": "Bulk edge above which eigenvalues count as signal: 'tracy_widom' (lambda+ plus the finite-sample "
            "Tracy-Widom margin, so pure noise keeps no direction) or 'bare' (the paper's lambda+ = "
            "sigma^2 (1 + sqrt(q))^2).",
            "choices": list(EDGES),
        },
    )
    min_rank: int = field(
        default=8,
        metadata={"help": "Fewest directions a site keeps, whatever its spectrum says; >= 1."},
    )

    # ---- schedule: which sites are cut, in what order, and how long each round distils ----------------------------
    rmtkd_targets: list[str] | None = field(
        default=None,
        metadata={
            "help": "Sites to cut: role names (embedding, attention_in, attention_out, ffn_in, ffn_inner, "
            "conv_inner, linear), glob patterns or regexes over site names. None: every site of the architecture's "
            "role table."
        },
    )
    reduction_kinds: list[str] = field(
        default_factory=lambda: list(DEFAULT_KINDS),
        metadata={
            "help": "Reduction kinds allowed: 'ffn_width' (shrink an FFN's inner width), 'low_rank' (factor a "
            "layer through its input's top-k directions), 'embedding' (factor the token embeddings), "
            "'attention_heads' (BERT family, only under target_params with the signal_fraction search or with "
            "head_signal_fraction: keep the fewest heads holding the kept fraction of the attention output's "
            "signal, so attention itself gets cheaper, which low_rank cannot do), 'residual' (post-LayerNorm "
            "encoders: BERT, RoBERTa, DistilBERT, ...; in the first round, before the cuts inside the layers, "
            "narrow the residual stream between every two LayerNorms to its outlier count, so every Linear, norm "
            "and residual add gets narrower; on a ResNet, keep each residual stream's outlier count of whole "
            "channels, so every convolution, BatchNorm, pooling and residual add on it gets narrower). Sites whose "
            "kind is not listed are left alone.",
            "choices": list(KINDS),
        },
    )
    head_signal_fraction: float | None = field(
        default=None,
        metadata={
            "help": "With 'attention_heads': the signal fraction each attention output's kept heads hold, when lower "
            "than the round's own (its signal fraction under target_params, else 1). A lower value drops more heads, "
            "and a parameter target gives what they held to the other sites: a head costs few parameters but a "
            "whole softmax(QK^T)V per token pair, so this trades parameters for speed. None (default): the round's "
            "own fraction."
        },
    )
    ffn_width_method: str = field(
        default="select",
        metadata={
            "help": "How ffn_width shrinks an FFN: 'select' (keep k whole neurons spanning the top-k eigen-directions "
            "and refit the down-projection by least squares) or 'fold' (the paper's rotation onto the top-k "
            "eigenvectors; only approximate through the activation function).",
            "choices": list(FFN_WIDTH_METHODS),
        },
    )
    embedding_vocabulary: str = field(
        default="all",
        metadata={
            "help": "Which tokens an 'embedding' cut stores codes for: 'all', or 'train': only the token ids that "
            "occur in train_dataset's input_ids (and the tokenizer's special tokens); every other token then reads "
            "the code of the kept token nearest to it in the original embedding. For a model that will only see "
            "text like its training data; on MiniLM-L6 / Rotten Tomatoes it keeps 13,448 of 30,522 tokens.",
            "choices": list(EMBEDDING_VOCABULARIES),
        },
    )
    sites_per_round: int = field(
        default=1,
        metadata={"help": "Sites cut per round, taken shallow to deep; >= 1 (the paper cuts one)."},
    )
    max_rounds: int | None = field(
        default=None,
        metadata={"help": "Most cut-and-distil rounds to run; >= 1. None: until a stopping rule ends the run."},
    )
    distillation_epochs_per_round: float = field(
        default=1.0,
        metadata={"help": "Epochs of self-distillation after each cut; > 0."},
    )
    distillation_steps_per_round: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps of self-distillation after each cut; > 0. When set, it overrides "
            "distillation_epochs_per_round."
        },
    )
    final_distillation_steps: int = field(
        default=0,
        metadata={
            "help": "After the last round, distil the compressed model for this many optimizer steps from the model "
            "as it was before the first cut (the rounds distil from the model before their own cut); kept unless "
            "the guarded metric falls by more than max_metric_drop during it. >= 0; 0: no final phase."
        },
    )
    warmup_metric_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Before the first cut, train on the task alone until the guarded eval metric reaches this value "
            "(at least it when greater is better, at most it for a loss), as the paper trains before reducing. "
            "None: cut the model as given."
        },
    )
    warmup_max_epochs: float = field(
        default=3.0,
        metadata={"help": "Most epochs of that warm-up training; > 0. Cutting starts when they run out."},
    )

    # ---- distillation: L = alpha CE(y, student) + (1 - alpha) T^2 KL(p_teacher^T || p_student^T) -----------------
    distillation_alpha: float = field(
        default=0.7,
        metadata={
            "help": "Weight alpha of the task loss in the distillation loss; the teacher term weighs 1 - alpha. "
            "In [0, 1]; the paper uses 0.7."
        },
    )
    distillation_hidden_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight beta of a feature term added to the distillation loss: the mean squared error between "
            "the student's and the teacher's hidden states (each layer's error relative to the teacher's mean "
            "square, real tokens only). With the 'residual' kind on a post-LayerNorm encoder the teacher's states are "
            "first moved into the coordinates of the student's narrowed stream. >= 0; 0 (the paper's loss, logits "
            "only) turns it off."
        },
    )
    distillation_temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature T of both distributions in the KL term; > 0."},
    )
    distillation_mask_prob: float = field(
        default=0.0,
        metadata={
            "help": "Text models: while distilling, also run both models on a copy of each batch in which this "
            "fraction of the real, non-special tokens is replaced by the tokenizer's mask token, and add the "
            "teacher term on it, (1 - alpha) T^2 KL, as extra unlabelled inputs (the copy's labels are not used). "
            "Costs a second forward and backward pass per step. Needs input_ids and a tokenizer with a mask token "
            "(processing_class, or the data collator's). In [0, 1); 0 turns it off."
        },
    )
    distillation_copy_tokens: str = field(
        default="mask",
        metadata={
            "help": "What the tokens chosen by distillation_mask_prob become in the copy: 'mask' (the mask token) or "
            "'neighbours' (one of the 10 tokens nearest to it in the teacher's input embedding, among those of "
            "train_dataset: TinyBERT-style word substitution, e.g. good -> excellent, bad or great).",
            "choices": list(COPY_TOKENS),
        },
    )

    distillation_mixup: float = field(
        default=0.0,
        metadata={
            "help": "While distilling, also run both models on a mixup of each batch (MixKD): every example blended "
            "with another one of the batch by a weight drawn from Beta(c, c), c being this value (text in the input "
            "embedding, images in pixel space), and add the teacher term on it, (1 - alpha) T^2 KL (the labels are "
            "not used). Costs a second forward and backward pass per step. > 0 turns it on; 0 turns it off.",
        },
    )

    # ---- stopping: when cutting ends ---------------------------------------------------------------------------
    target_params: float | None = field(
        default=None,
        metadata={
            "help": "Stop once the model has at most this many parameters: a ratio in (0, 1) is a fraction of the "
            "original count (0.2 keeps a fifth), a whole number >= 1 is an absolute count. None: no target."
        },
    )
    target_search: str = field(
        default="signal_fraction",
        metadata={
            "help": "How a round reaches target_params when the spectrum's own cut (every outlier above the MP edge) "
            "would leave the model above it; searched on parameter counts alone, never on a metric. "
            "'signal_fraction' (default): every site keeps the fewest outliers holding the same fraction of its "
            "signal variance (the variance above the noise, spiked-model debiased), so a site whose signal is spread "
            "over many directions keeps many. 'quantile': raise the quantile tau (and so the edge) at every site. "
            "'none': the spectrum's own cut is the most a run removes. The fraction or tau used is in the round log.",
            "choices": list(TARGET_SEARCHES),
        },
    )
    max_metric_drop: float = field(
        default=0.01,
        metadata={
            "help": "Largest allowed worsening of the guarded eval metric against its value before the first cut, "
            "in the metric's own units (0.01 = one accuracy point when accuracy is a fraction); >= 0. A round "
            "that exceeds it is rolled back."
        },
    )
    min_keep_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Stop cutting a site when its kept fraction k/d falls below this ratio (rho_min of the paper); "
            "in [0, 1)."
        },
    )
    rmtkd_metric: str | None = field(
        default=None,
        metadata={
            "help": "Eval metric guarded by max_metric_drop, with or without the 'eval_' prefix. None: "
            "metric_for_best_model when set, else 'accuracy' when the evaluation reports it, else 'loss'. Names "
            "ending in 'loss' are worse when larger; greater_is_better decides for metric_for_best_model."
        },
    )

    # ---- recovery: optional LoRA adapters during distillation --------------------------------------------------
    lora_recovery: bool = field(
        default=False,
        metadata={
            "help": "Distil through PEFT LoRA adapters on the reduced model instead of its full weights; the adapters "
            "are merged into the weights when the model is saved."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "Rank of the LoRA adapters; >= 1."})
    lora_alpha: int = field(
        default=16, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r); >= 1."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA adapter inputs; in [0, 1)."})

    def __post_init__(self):
        # Refuse unsupported setups before the parent runs: its __post_init__ would otherwise fail first with an
        # unrelated message (a DeepSpeed import error, a save/eval strategy mismatch for load_best_model_at_end).
        self._refuse_unsupported()
        super().__post_init__()
        self.rmtkd_targets = _as_list(self.rmtkd_targets)
        self.reduction_kinds = _as_list(self.reduction_kinds)
        self._validate_rmtkd_fields()

    def _refuse_unsupported(self) -> None:
        if self.load_best_model_at_end:
            raise ValueError(
                "load_best_model_at_end=True is not supported with RMT-KD: checkpoints of different rounds have "
                "different shapes, so the best one may not load into the final model. RMT-KD keeps the best model "
                "itself: a round whose eval metric drops by more than max_metric_drop is rolled back. Set "
                "load_best_model_at_end=False."
            )
        if self.fsdp or _env_flag("ACCELERATE_USE_FSDP"):
            raise ValueError(
                "FSDP (the fsdp argument or an accelerate config with FSDP) is not supported yet by RMT-KD: its "
                "module surgery needs whole, unsharded parameters. Use plain data parallel "
                "(accelerate launch --num_processes N)."
            )
        if self.deepspeed or _env_flag("ACCELERATE_USE_DEEPSPEED"):
            raise ValueError(
                "DeepSpeed (the deepspeed argument or an accelerate config with DeepSpeed) is not supported yet by "
                "RMT-KD: its module surgery needs whole, unsharded parameters and a rebuildable optimizer. Use plain "
                "data parallel (accelerate launch --num_processes N)."
            )

    def _require(self, name: str, ok: bool, rule: str) -> None:
        if not ok:
            raise ValueError(f"{name} must {rule}, got {getattr(self, name)!r}.")

    def _validate_rmtkd_fields(self) -> None:
        # Checks are written so that a value of the wrong type fails with the same message instead of a TypeError.
        def number_in(name, low, high, *, low_open, high_open):
            v = getattr(self, name)
            ok = _is_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            self._require(name, ok, f"lie in {interval}")

        def positive(name, *, optional=False):
            v = getattr(self, name)
            self._require(name, (optional and v is None) or (_is_number(v) and v > 0), "be > 0")

        def int_at_least_1(name, *, optional=False):
            v = getattr(self, name)
            rule = "be None or an integer >= 1" if optional else "be an integer >= 1"
            self._require(name, (optional and v is None) or (_is_int(v) and v >= 1), rule)

        def one_of(name, choices):
            self._require(name, getattr(self, name) in choices, f"be one of {tuple(choices)}")

        def boolean(name):
            self._require(name, isinstance(getattr(self, name), bool), "be True or False")

        # calibration
        number_in("calibration_fraction", 0, 1, low_open=True, high_open=False)
        int_at_least_1("calibration_max_examples", optional=True)
        int_at_least_1("calibration_max_tokens", optional=True)
        boolean("calibration_centre")
        one_of("effective_samples", EFFECTIVE_SAMPLES)
        # spectrum
        one_of("spectrum_estimator", ESTIMATORS)
        number_in("spectrum_quantile", 0, 1, low_open=True, high_open=True)
        one_of("spectrum_edge", EDGES)
        int_at_least_1("min_rank")
        # schedule
        targets = self.rmtkd_targets
        listed = isinstance(targets, list) and len(targets) > 0 and all(isinstance(t, str) and t for t in targets)
        self._require(
            "rmtkd_targets",
            targets is None or listed,
            "be None (every site) or a non-empty list of non-empty role names, globs or regexes",
        )
        kinds = self.reduction_kinds
        known = isinstance(kinds, list) and len(kinds) > 0 and all(k in KINDS for k in kinds)
        self._require(
            "reduction_kinds",
            known and len(set(kinds)) == len(kinds),
            f"be a non-empty list of distinct kinds from {KINDS}",
        )
        fraction = self.head_signal_fraction
        self._require("head_signal_fraction", fraction is None or (_is_number(fraction) and 0 <= fraction <= 1),
                      "be None or lie in [0, 1]")
        self._require("head_signal_fraction", fraction is None or "attention_heads" in (kinds or []),
                      "be None unless reduction_kinds includes 'attention_heads'")
        one_of("ffn_width_method", FFN_WIDTH_METHODS)
        one_of("embedding_vocabulary", EMBEDDING_VOCABULARIES)
        int_at_least_1("sites_per_round")
        int_at_least_1("max_rounds", optional=True)
        positive("distillation_epochs_per_round")
        int_at_least_1("distillation_steps_per_round", optional=True)
        self._require("final_distillation_steps",
                      _is_int(self.final_distillation_steps) and self.final_distillation_steps >= 0,
                      "be an integer >= 0")
        self._require(
            "warmup_metric_threshold",
            self.warmup_metric_threshold is None or _is_number(self.warmup_metric_threshold),
            "be None or a finite number",
        )
        positive("warmup_max_epochs")
        # distillation
        number_in("distillation_alpha", 0, 1, low_open=False, high_open=False)
        positive("distillation_temperature")
        number_in("distillation_mask_prob", 0, 1, low_open=False, high_open=True)
        one_of("distillation_copy_tokens", COPY_TOKENS)
        self._require("distillation_mixup", _is_number(self.distillation_mixup) and self.distillation_mixup >= 0,
                      "be >= 0")
        self._require("distillation_hidden_weight",
                      _is_number(self.distillation_hidden_weight) and self.distillation_hidden_weight >= 0, "be >= 0")
        # stopping
        target = self.target_params
        is_ratio = _is_number(target) and 0 < target < 1
        is_count = _is_number(target) and target >= 1 and float(target).is_integer()
        self._require(
            "target_params",
            target is None or is_ratio or is_count,
            "be None, a ratio in (0, 1) of the original parameter count, or a whole number >= 1 of parameters",
        )
        one_of("target_search", TARGET_SEARCHES)
        self._require("max_metric_drop", _is_number(self.max_metric_drop) and self.max_metric_drop >= 0, "be >= 0")
        number_in("min_keep_ratio", 0, 1, low_open=False, high_open=True)
        self._require(
            "rmtkd_metric",
            self.rmtkd_metric is None or (isinstance(self.rmtkd_metric, str) and self.rmtkd_metric),
            "be None or a non-empty metric name",
        )
        # recovery
        boolean("lora_recovery")
        int_at_least_1("lora_r")
        int_at_least_1("lora_alpha")
        number_in("lora_dropout", 0, 1, low_open=False, high_open=True)

    def param_target(self, original: int) -> int | None:
        """Resolve ``target_params`` to an absolute parameter count.

        Args:
            original: parameter count of the model before the first cut.

        Returns:
            None when there is no target; ``target_params · original`` rounded to the nearest integer for a ratio
            (rounding, not flooring, so that 0.29 · 100 gives 29 despite float error); the count itself for a whole
            number (a count at or above ``original`` is met before any cut).
        """
        if not _is_int(original) or original < 1:
            raise ValueError(f"param_target needs the original parameter count as an integer >= 1, got {original!r}.")
        if self.target_params is None:
            return None
        if self.target_params < 1:
            return round(self.target_params * original)
        return int(self.target_params)

    def guarded_metric(self, metrics: Mapping[str, float]) -> str:
        """Pick the key of ``metrics`` that the accept/rollback rule watches.

        The name is ``rmtkd_metric`` if set, else ``metric_for_best_model`` if set, else ``"accuracy"`` when
        ``metrics`` holds it, else ``"loss"``. Each name is looked up as given and with the ``eval_`` prefix that
        `Trainer.evaluate` adds.

        Args:
            metrics: an evaluation result, e.g. ``{"eval_loss": 0.41, "eval_accuracy": 0.86}``.

        Returns:
            The key found in ``metrics``.
        """
        if self.rmtkd_metric is not None:
            names = [self.rmtkd_metric]
        elif self.metric_for_best_model is not None:
            names = [self.metric_for_best_model]
        else:
            names = ["accuracy", "loss"]
        for name in names:
            for key in (name, f"eval_{name}"):
                if key in metrics:
                    return key
        raise ValueError(
            f"The evaluation reports none of {names} (keys: {sorted(metrics)}). Set rmtkd_metric to one of those "
            "keys, or make compute_metrics return it."
        )

    def metric_greater_is_better(self, metric: str) -> bool:
        """Whether larger values of ``metric`` are better.

        ``greater_is_better`` decides for ``metric_for_best_model``; any other metric is better when larger unless its
        name ends in ``"loss"`` (the rule transformers applies to ``metric_for_best_model``).

        Args:
            metric: a metric name, with or without the ``eval_`` prefix.
        """
        bare = metric.removeprefix("eval_")
        if (
            self.greater_is_better is not None
            and self.metric_for_best_model is not None
            and self.metric_for_best_model.removeprefix("eval_") == bare
        ):
            return self.greater_is_better
        return not bare.endswith("loss")

    def metric_drop(self, before: float, after: float, metric: str) -> float:
        """How much ``metric`` got worse from ``before`` to ``after``, in its own units (negative: it improved).

        A round is accepted when ``metric_drop(reference, new, metric) <= max_metric_drop``; the warm-up reached
        ``warmup_metric_threshold`` when ``metric_drop(warmup_metric_threshold, value, metric) <= 0``.

        Args:
            before: the reference value.
            after: the new value.
            metric: the metric name (sets the direction, see `metric_greater_is_better`).
        """
        return before - after if self.metric_greater_is_better(metric) else after - before
