"""The compression baselines RMT-KD is compared with, and the distillation every distilled row shares.

Each baseline returns a model of (nearly) the RMT-KD model's total parameter count, so that rows compare accuracy at
matched size; the knob that sets the size (a rank, an energy threshold) is searched on parameter counts alone, never
on accuracy, so no test data is involved:

- `svd_uniform`: every encoder Linear (and the token embedding) factored from its own weight SVD at one rank r
  (`svd_rank_ratio` does the same for convolutions, at one fraction of their input channels);
- `pca_energy`: the RMT-KD machinery with the Marchenko-Pastur edge replaced by "keep the fewest directions holding
  a fraction of the variance" at every site, from the same calibration statistics;
- `layer_drop`: keep every other encoder layer, or every other block of each ResNet stage (DistilBERT-style
  initialisation from the teacher's), then factored as `svd_uniform` or `svd_rank_ratio` to reach the matched size;
- `rmtkd_without_distillation`: RMT-KD's rounds of calibrate, plan, cut with no distillation in between (the
  ablation of the "KD" in RMT-KD).

`distil` trains any of them with RMT-KD's own loss, ``α·CE + (1−α)·T²·KL(teacher ‖ student)``, for a given number of
steps, so every distilled row gets the same budget.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_rmtkd.architectures import find_sites
from hf_rmtkd.calibration import collect_statistics, measure_sites
from hf_rmtkd.cut import apply_plan
from hf_rmtkd.distillation import (
    data_token_neighbours,
    distillation_loss,
    hidden_state_loss,
    mask_tokenizer,
    masked_copy_loss,
    mixup_copy_loss,
)
from hf_rmtkd.modeling import rmtkd_class_for
from hf_rmtkd.plan import keep_signal_fraction, plan_reductions
from hf_rmtkd.reductions import apply_embedding, apply_low_rank, embedding_parameters, low_rank_parameters
from hf_rmtkd.training_args import RMTKDTrainingArguments

__all__ = [
    "KDTrainer",
    "cut_at_ranks",
    "distil",
    "energy_rank",
    "layer_drop",
    "match_parameter",
    "pca_energy",
    "pca_energy_params",
    "rmtkd_without_distillation",
    "svd_rank_ratio",
    "svd_rank_ratio_params",
    "svd_uniform",
    "svd_uniform_params",
    "wrap",
]


def wrap(base: nn.Module, reductions: dict) -> nn.Module:
    """Wrap a reduced base model as an RMTKD model (so it saves and reloads like RMT-KD's own output)."""
    return rmtkd_class_for(base).from_base(base, reductions) if reductions else base


def match_parameter(count: Callable[[float], int], target: int, low: float, high: float, *, integer: bool,
                    steps: int = 40) -> float:
    """Bisect a size knob x in [low, high] so that ``count(x)`` (non-decreasing in x) is closest to ``target``.

    Only parameter counts are looked at, never a metric: matching sizes must not peek at accuracy.

    Returns:
        The x whose count is closest to ``target`` among the bracketing values found.
    """
    lo, hi = low, high
    for _ in range(steps):
        if (integer and hi - lo <= 1) or (not integer and hi - lo < 1e-6):
            break
        mid = (lo + hi) // 2 if integer else (lo + hi) / 2
        if count(mid) < target:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda x: abs(count(x) - target))


# --------------------------------------------------------------------------------------------------------------------
# Truncated weight SVD
# --------------------------------------------------------------------------------------------------------------------


def _right_singular_vectors(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` right singular vectors of a (rows, d_in) matrix, as (rank, d_in) orthonormal rows."""
    _, _, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    return vh[:rank]


def _encoder_linears(model: nn.Module) -> list[str]:
    """Paths of every ``nn.Linear`` inside the encoder blocks (attention, FFN), i.e. the sites RMT-KD may cut."""
    return [path for path, module in model.named_modules() if isinstance(module, nn.Linear) and ".encoder." in
            f".{path}"]


def _embedding_path(model: nn.Module) -> str:
    return next(path for path, m in model.named_modules() if path.endswith("word_embeddings"))


def _linear_params(layer: nn.Linear) -> int:
    return layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)


def _svd_linear_ranks(model: nn.Module, rank: int) -> list[str]:
    """The encoder Linears that a rank-``rank`` factorisation makes smaller (the others stay dense)."""
    return [path for path in _encoder_linears(model)
            if low_rank_parameters(model.get_submodule(path).in_features, model.get_submodule(path).out_features,
                                   rank) < _linear_params(model.get_submodule(path))]


def _embedding_saving(model: nn.Module, rank: int) -> int:
    vocab, dim = model.get_submodule(_embedding_path(model)).weight.shape
    return vocab * dim - embedding_parameters(vocab, dim, rank)


def svd_uniform_params(teacher: nn.Module, rank: int, *, embedding: bool = True) -> int:
    """The parameter count `svd_uniform` reaches at ``rank``, computed without any SVD."""
    saved = sum(_linear_params(teacher.get_submodule(p)) - low_rank_parameters(
        teacher.get_submodule(p).in_features, teacher.get_submodule(p).out_features, rank)
        for p in _svd_linear_ranks(teacher, rank))
    return teacher.num_parameters() - saved - (_embedding_saving(teacher, rank) if embedding else 0)


def svd_uniform(teacher: nn.Module, rank: int, *, embedding: bool = True) -> nn.Module:
    """Truncated weight SVD at one rank: ``W ≈ (W V_rᵀ) V_r`` for every encoder Linear and the token embedding.

    ``V_r`` (the top-r right singular vectors of W) plays the projection of `apply_low_rank`, so the factors are
    exactly the rank-r truncated SVD, stored in the same modules as RMT-KD's low-rank cuts. A layer whose
    factorisation would not save parameters at this rank is left dense.

    Args:
        teacher: a BERT-family sequence classifier (not modified).
        rank: r, the same for every layer.
        embedding: also factor the token embedding (it holds half of MiniLM's parameters, so a size match with a
            model whose embedding RMT-KD factored is impossible without it).

    Returns:
        The factored model, wrapped as an RMTKD model.
    """
    model = copy.deepcopy(teacher)
    entries = {}
    for path in _svd_linear_ranks(model, rank):
        apply_low_rank(model, path, _right_singular_vectors(model.get_submodule(path).weight, rank))
        entries[path] = {"kind": "low_rank", "rank": rank}
    if embedding:
        path = _embedding_path(model)
        apply_embedding(model, path, _right_singular_vectors(model.get_submodule(path).weight, rank))
        entries[path] = {"kind": "embedding", "rank": rank}
    return wrap(model, entries)


def _conv_ranks(model: nn.Module, ratio: float) -> dict[str, int]:
    """``{path: rank}`` of the encoder convolutions that a factorisation at ``ceil(ratio·c_in)`` makes smaller."""
    ranks = {}
    for path, conv in model.named_modules():
        if not isinstance(conv, nn.Conv2d) or ".encoder." not in f".{path}" or conv.groups != 1:
            continue
        c_out, c_in, kh, kw = conv.weight.shape
        rank = max(1, math.ceil(ratio * c_in))
        if rank * c_in + rank * c_out * kh * kw + c_out < conv.weight.numel():
            ranks[path] = rank
    return ranks


def svd_rank_ratio_params(teacher: nn.Module, ratio: float) -> int:
    """The parameter count `svd_rank_ratio` reaches at ``ratio``, computed without any SVD."""
    total = teacher.num_parameters()
    for path, rank in _conv_ranks(teacher, ratio).items():
        c_out, c_in, kh, kw = teacher.get_submodule(path).weight.shape
        total -= teacher.get_submodule(path).weight.numel() - (rank * c_in + rank * c_out * kh * kw + c_out)
    return total


def svd_rank_ratio(teacher: nn.Module, ratio: float) -> nn.Module:
    """Truncated SVD of every encoder convolution, along its input channels, at one fraction of them.

    A conv weight (c_out, c_in, kh, kw) is unfolded to (c_out·kh·kw, c_in); its top right singular vectors give the
    1×1 down-projection of `apply_low_rank` (a rank-r truncation of that unfolding). Convolution widths differ by
    stage, so the uniform knob is the kept fraction ``ceil(ratio·c_in)``, not an absolute rank. Convolutions whose
    factorisation would not save parameters are left dense.
    """
    model = copy.deepcopy(teacher)
    entries = {}
    for path, rank in _conv_ranks(model, ratio).items():
        conv = model.get_submodule(path)
        unfolded = conv.weight.detach().permute(0, 2, 3, 1).reshape(-1, conv.in_channels)
        apply_low_rank(model, path, _right_singular_vectors(unfolded, rank))
        entries[path] = {"kind": "low_rank", "rank": rank}
    return wrap(model, entries)


# --------------------------------------------------------------------------------------------------------------------
# Activation PCA at a fixed energy threshold
# --------------------------------------------------------------------------------------------------------------------


def energy_rank(eigenvalues: torch.Tensor, threshold: float) -> int:
    """The fewest leading eigen-directions whose eigenvalues hold ``threshold`` of the total variance."""
    lam = eigenvalues.clamp_min(0).to(torch.float64)
    cumulative = torch.cumsum(lam, 0) / lam.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return int(min(lam.numel(), int((cumulative < threshold).sum()) + 1))


def _with_energy_ranks(measurements, threshold: float):
    """Copies of the measurements whose outlier count k is the energy rank (eigenvectors, once computed, shared)."""
    return [m.with_outliers(replace(m.outliers, k=energy_rank(m.eigenvalues, threshold))) for m in measurements]


def pca_energy(teacher: nn.Module, measurements, threshold: float, *, kinds, min_rank: int,
               ffn_method: str = "select") -> nn.Module:
    """Cut every site of ``teacher`` to its energy rank at ``threshold``, with RMT-KD's own planner and surgery.

    Args:
        teacher: the model the measurements were taken on (not modified).
        measurements: `hf_rmtkd.calibration.measure_sites` output for ``teacher``.
        threshold: the fraction of variance each site keeps, in (0, 1].
        kinds, min_rank, ffn_method: as for `hf_rmtkd.compress`.
    """
    return cut_at_ranks(teacher, _with_energy_ranks(measurements, threshold), kinds=kinds, min_rank=min_rank,
                        ffn_method=ffn_method)


def cut_at_ranks(teacher: nn.Module, ranked, *, kinds, min_rank: int, ffn_method: str = "select") -> nn.Module:
    """A copy of ``teacher`` with every site cut to the outlier count ``k`` its measurement in ``ranked`` carries,
    with RMT-KD's own planner and surgery (the baselines differ only in how they set each k)."""
    model = copy.deepcopy(teacher)
    plan = plan_reductions(ranked, model, kinds=kinds, min_rank=min_rank)
    return wrap(model, apply_plan(model, plan, ranked, ffn_method=ffn_method))


def pca_energy_params(teacher: nn.Module, measurements, threshold: float, *, kinds, min_rank: int) -> int:
    """The parameter count `pca_energy` would reach at ``threshold``, from the plan alone (no surgery)."""
    plan = plan_reductions(_with_energy_ranks(measurements, threshold), teacher, kinds=kinds, min_rank=min_rank)
    return teacher.num_parameters() - plan.params_saved


# --------------------------------------------------------------------------------------------------------------------
# Layer dropping
# --------------------------------------------------------------------------------------------------------------------


# The stacks of repeated blocks that layer dropping thins: a BERT-family encoder's layer list, each ResNet stage's
# layers (whose first block, the one that changes width and stride, is always kept).
LAYER_STACK = re.compile(r"(^|\.)encoder\.(layer|stages\.\d+\.layers)$")


def _layer_stacks(model: nn.Module) -> dict[str, nn.Module]:
    return {path: module for path, module in model.named_modules() if LAYER_STACK.search(path)}


def layer_drop(teacher: nn.Module) -> nn.Module:
    """Keep blocks 0, 2, 4, ... of every stack, initialised from the teacher's (as DistilBERT did).

    A BERT-family encoder keeps layers 0, 2, 4, ...; a ResNet keeps blocks 0, 2, ... of every stage, so the first
    block of a stage (which changes the width and the stride) always stays. To reach a matched size, factor the result
    further (`svd_uniform`, `svd_rank_ratio`): dropping layers alone cannot shrink an embedding-heavy model, or a
    ResNet of two blocks a stage, far enough.

    Args:
        teacher: a BERT-family model (``<base>.encoder.layer``) or a ResNet (``<base>.encoder.stages[i].layers``);
            not modified.
    """
    model = copy.deepcopy(teacher)
    for path, stack in _layer_stacks(model).items():
        parent, _, name = path.rpartition(".")
        kept = [layer for index, layer in enumerate(stack) if index % 2 == 0]
        setattr(model.get_submodule(parent), name, nn.ModuleList(kept) if isinstance(stack, nn.ModuleList)
                else nn.Sequential(*kept))
    if hasattr(model.config, "depths"):  # ResNet-style configs count blocks per stage
        model.config.depths = [math.ceil(depth / 2) for depth in model.config.depths]
    else:
        model.config.num_hidden_layers = len(model.base_model.encoder.layer)
    return model


# --------------------------------------------------------------------------------------------------------------------
# RMT-KD's rounds without the distillation
# --------------------------------------------------------------------------------------------------------------------


def rmtkd_without_distillation(teacher: nn.Module, calibration, *, rounds: list[dict], sites_per_round: int,
                               kinds, min_rank: int, exclude=(), ffn_method: str = "select",
                               batch_size: int = 64) -> nn.Module:
    """Repeat RMT-KD's round structure (calibrate the current model, cut the next sites) with no training at all.

    Args:
        teacher: the model to cut (not modified).
        calibration: calibration data (a tokenized `Dataset` without labels, or pixel values).
        rounds: the log entries of the rounds the distilled run accepted: each gives the τ (``spectrum_quantile``) and
            the signal fraction (``signal_fraction``) that round used (with a parameter target the run searches them).
        sites_per_round: sites cut per round, as in that run.
        kinds, min_rank, ffn_method: the run's reduction settings.
        exclude: sites the run rolled back (never cut).
    """
    model = copy.deepcopy(teacher)
    entries: dict = {}
    for entry in rounds:
        sites = find_sites(model)
        statistics = collect_statistics(model, calibration, sites, batch_size=batch_size, progress=False)
        measurements = measure_sites(statistics, sites, quantile=entry["spectrum_quantile"])
        measurements = keep_signal_fraction(measurements, entry.get("signal_fraction", 1.0))
        plan = plan_reductions(measurements, model, kinds=kinds, min_rank=min_rank, max_sites=sites_per_round,
                               exclude=set(exclude))
        if not plan.cuts:
            break
        entries.update(apply_plan(model, plan, measurements, ffn_method=ffn_method))
    return wrap(model, entries)


# --------------------------------------------------------------------------------------------------------------------
# Distillation with RMT-KD's loss
# --------------------------------------------------------------------------------------------------------------------


def _library_default(name: str):
    return RMTKDTrainingArguments.__dataclass_fields__[name].default


class KDTrainer(Trainer):
    """A `Trainer` whose loss is RMT-KD's against a frozen teacher, with the library's default weights:
    ``α·CE + (1−α)·T²·KL(teacher ‖ student) + β·hidden_state_loss`` (+ the masked-copy term when ``mask_prob`` > 0,
    the mixup term when ``mixup`` > 0).

    A student shallower than its teacher (layer dropping) matches its hidden states to evenly spaced ones of the
    teacher's (DistilBERT's pairing: student layer i against teacher layer 2i when every other layer is kept).
    """

    def __init__(self, *args, teacher: nn.Module, alpha: float = _library_default("distillation_alpha"),
                 temperature: float = _library_default("distillation_temperature"),
                 hidden_weight: float = _library_default("distillation_hidden_weight"),
                 mask_prob: float = _library_default("distillation_mask_prob"),
                 copy_tokens: str = _library_default("distillation_copy_tokens"),
                 mixup: float = _library_default("distillation_mixup"), **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()  # used under no_grad only; its requires_grad flags stay as they are
        self.alpha, self.temperature, self.hidden_weight = alpha, temperature, hidden_weight
        self.mask_prob, self.copy_tokens, self.mixup = mask_prob, copy_tokens, mixup
        self._neighbours = None  # copy_tokens "neighbours": the substitution table, built at first use

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        features = {k: v for k, v in inputs.items() if k != "labels"}
        if self.hidden_weight > 0:
            features["output_hidden_states"] = True
        outputs = model(**features)
        with torch.no_grad():
            teacher_outputs = self.teacher(**features)
        # Per-batch mean (no gradient accumulation here), as RMTKDTrainer's loss is with one accumulation step.
        loss, _, _ = distillation_loss(outputs.logits, teacher_outputs.logits, labels, alpha=self.alpha,
                                       temperature=self.temperature)
        if self.mask_prob > 0:
            tokenizer = mask_tokenizer(self.processing_class, self.data_collator)
            if self.copy_tokens == "neighbours" and self._neighbours is None:
                self._neighbours = data_token_neighbours(self.teacher, self.train_dataset, tokenizer)
            loss = loss + (1.0 - self.alpha) * masked_copy_loss(model, self.teacher, features, tokenizer,
                                                                probability=self.mask_prob,
                                                                neighbours=self._neighbours,
                                                                temperature=self.temperature)
        if self.mixup > 0:
            loss = loss + (1.0 - self.alpha) * mixup_copy_loss(model, self.teacher, features,
                                                               concentration=self.mixup, temperature=self.temperature)
        if self.hidden_weight > 0:
            student_hidden, teacher_hidden = outputs.hidden_states, teacher_outputs.hidden_states
            depth, teacher_depth = len(student_hidden) - 1, len(teacher_hidden) - 1
            paired = tuple(teacher_hidden[round(i * teacher_depth / depth)] for i in range(depth + 1))
            loss = loss + self.hidden_weight * hidden_state_loss(student_hidden, paired,
                                                                 features.get("attention_mask"))
        return (loss, outputs) if return_outputs else loss


# `RMTKDTrainingArguments` field -> `KDTrainer` argument: a loss given by the library's names reaches both alike.
KD_LOSS_FIELDS = {"distillation_alpha": "alpha", "distillation_temperature": "temperature",
                  "distillation_hidden_weight": "hidden_weight", "distillation_mask_prob": "mask_prob",
                  "distillation_copy_tokens": "copy_tokens", "distillation_mixup": "mixup"}


def distil(student: nn.Module, teacher: nn.Module, train_dataset, *, steps: int, args: TrainingArguments,
           data_collator=None, loss: dict | None = None) -> nn.Module:
    """Distil ``student`` from ``teacher`` for exactly ``steps`` optimizer steps (returns the student, trained).

    ``args`` supplies the learning rate, batch size, seed and schedule shared with the RMT-KD run; ``max_steps`` is
    overridden by ``steps``. ``loss``: the distillation settings that differ from the library's defaults, by their
    `RMTKDTrainingArguments` names (the keys of `KD_LOSS_FIELDS`).
    """
    unknown = set(loss or {}) - set(KD_LOSS_FIELDS)
    if unknown:
        raise ValueError(f"distil: no KD setting named {sorted(unknown)}; known: {sorted(KD_LOSS_FIELDS)}.")
    if steps <= 0:
        return student
    run_args = copy.deepcopy(args)
    run_args.max_steps = steps
    run_args.save_strategy = "no"
    trainer = KDTrainer(model=student, args=run_args, train_dataset=train_dataset, data_collator=data_collator,
                        teacher=teacher, **{KD_LOSS_FIELDS[name]: value for name, value in (loss or {}).items()})
    trainer.train()
    return trainer.model
