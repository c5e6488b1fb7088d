"""The self-distillation loss of RMT-KD, and the frozen teacher it distils from.

After each cut the reduced model (the student) learns from the labels and from the model as it was just before the
cut (the teacher):

    L = α·CE(y, student) + (1 − α)·T²·KL(p_teacher^T ‖ p_student^T),    p^T = softmax(logits / T)

with α = 0.7 and T = 1 by default (paper §1.7; the T² factor is the classic distillation convention, which keeps the
gradient scale of the KL term independent of T, and equals 1 at the default T).

Both terms are sums over the real items of a batch (examples, or tokens that carry a label) divided by one count:
``num_items_in_batch`` when the trainer gives it, which is the item count of the whole accumulated batch, so the
gradients of the micro-batches add up to exactly the gradient of the whole batch; otherwise the item count of this
batch. This is how transformers normalises its own token-level losses.

An optional feature term (not in the paper, off by default) adds ``β · hidden_state_loss``: the default kinds never
narrow the residual stream, so every hidden state of the student has the teacher's shape and can be matched one to
one. With the ``residual`` kind the student holds each hidden state in the coordinates z = Bᵀ(y − μ) of its stream's
kept directions, and the teacher's are moved into them first (`hidden_state_coordinates`).
Another (also off by default) adds the teacher term on a copy of each text batch with some tokens changed: masked
(`mask_tokens`) or swapped for one of their nearest tokens in the teacher's input embedding (`substitute_tokens`,
TinyBERT's word substitution): inputs the data does not hold, labelled by the teacher. A third (off by default)
adds it on a mixup of each batch (`mixup_copy_loss`, MixKD): every example blended with another one of the batch, in
the input embedding for text and in pixel space for images.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .reductions.embedding import centred_unit_rows, token_ids_used
from .utils import tokenizer_with

__all__ = [
    "data_token_neighbours", "distillation_loss", "hidden_state_loss", "mask_tokenizer", "mask_tokens",
    "masked_copy_loss", "mixup_copy_loss", "mixup_inputs", "substitute_tokens", "teacher_copy", "token_neighbours",
]


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    # log_softmax and sums over a vocabulary lose too much precision in bf16/fp16; float64 stays float64.
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    alpha: float = 0.7,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The RMT-KD loss ``α·CE(y, student) + (1 − α)·T²·KL(p_teacher^T ‖ p_student^T)`` over the real items of a batch.

    Shapes (C classes, V vocabulary):

    - sequence / image classification: logits (B, C), labels (B,);
    - token classification: logits (B, T, C), labels (B, T);
    - causal LM: logits (B, T, V), labels (B, T) with ``shift_labels=True``: position t predicts token t + 1, so the
      last logit and the first label are dropped;
    - regression (C = 1, as transformers decides ``problem_type``): logits (B, 1), float labels (B,) or (B, 1).
      The task term is the squared error to the labels and the teacher term the squared error to the teacher's
      output; the temperature does not apply (there is no softmax) and neither does T².

    Items whose label is ``ignore_index`` (or whose ``attention_mask`` is 0) are left out of both terms. The CE uses
    the raw logits (T = 1); only the KL term is softened by T. Both are computed in float32 at least, whatever the
    dtype of the logits. The teacher logits are detached, so gradients reach the student only.

    Args:
        student_logits: logits of the reduced model, (B, C) or (B, T, C).
        teacher_logits: logits of the frozen pre-cut model, same shape.
        labels: (B,) or (B, T) targets, or None for unlabelled distillation: the loss is then ``T²·KL`` alone.
        alpha: weight of the task term, in [0, 1]; the teacher term weighs ``1 − alpha``.
        temperature: softmax temperature T of the KL term, > 0.
        num_items_in_batch: real items in the whole accumulated batch (what `Trainer` passes to ``compute_loss``).
            When given, both sums are divided by it and the loss is already scaled for gradient accumulation; the
            caller still multiplies by the number of processes when ``average_tokens_across_devices`` summed it over
            processes (as `Trainer.compute_loss` does). When None, both sums are divided by this batch's item count.
        ignore_index: label value of positions to leave out.
        shift_labels: causal LM: compare logits at position t with the label at t + 1 (a flag, unlike the tensor
            argument of the same name in transformers' loss functions).
        attention_mask: optional (B, T) mask of real tokens, for token-level distillation without labels (padding
            would otherwise count); shifted like the labels.

    Returns:
        ``(loss, ce, kl)``: the scalar loss to back-propagate, and the detached task term (None without labels) and
        teacher term (KL, or the squared error for regression), each normalised like the loss but unweighted.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape; the cut must keep the model's output layer."
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")

    student = _at_least_float32(student_logits)
    teacher = _at_least_float32(teacher_logits.detach()).to(student.dtype)
    if shift_labels:
        if student.dim() != 3:
            raise ValueError(f"shift_labels=True needs (B, T, V) logits, got {tuple(student.shape)}.")
        # Position t predicts token t + 1: drop the last prediction and the first target.
        student, teacher = student[:, :-1], teacher[:, :-1]
        labels = labels[:, 1:] if labels is not None else None
        attention_mask = attention_mask[:, 1:] if attention_mask is not None else None

    num_classes = student.shape[-1]
    regression = num_classes == 1
    item_shape = student.shape[:-1]
    if labels is not None and regression and labels.shape != item_shape:
        labels = labels.reshape(item_shape)  # (B, 1) float labels of a regression head
    if labels is not None and labels.shape != item_shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match the logits {tuple(student.shape)}: expected "
            f"{tuple(item_shape)}. "
            "Multi-label and soft-label targets are not supported; causal LMs need shift_labels=True."
        )

    # One row per item: (N, C) logits, (N,) labels and the mask of real items.
    student = student.reshape(-1, num_classes)
    teacher = teacher.reshape(-1, num_classes)
    real = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
    if labels is not None:
        labels = labels.reshape(-1)
        real &= labels != ignore_index
    if attention_mask is not None:
        real &= attention_mask.reshape(-1).bool()
    student, teacher = student[real], teacher[real]

    if num_items_in_batch is None:
        # clamp: a batch with no real item gives a zero loss that still carries a (zero) gradient.
        denominator = real.sum().clamp(min=1).to(student.dtype)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=student.device).to(student.dtype)

    if regression:
        teacher_term = (student - teacher).pow(2).sum() / denominator
        scaled_teacher_term = teacher_term
    else:
        log_p_student = F.log_softmax(student / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
        # kl_div(input, target, log_target=True) is KL(target ‖ input): here KL(p_teacher ‖ p_student), per item.
        kl_per_item = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)
        teacher_term = kl_per_item.sum() / denominator
        scaled_teacher_term = temperature**2 * teacher_term

    if labels is None:
        return scaled_teacher_term, None, teacher_term.detach()

    targets = labels[real]
    if regression:
        task_term = (student.squeeze(-1) - targets.to(student.dtype)).pow(2).sum() / denominator
    else:
        task_term = F.cross_entropy(student, targets.long(), reduction="sum") / denominator
    loss = alpha * task_term + (1.0 - alpha) * scaled_teacher_term
    return loss, task_term.detach(), teacher_term.detach()


def hidden_state_loss(
    student_hidden: tuple[torch.Tensor, ...],
    teacher_hidden: tuple[torch.Tensor, ...],
    attention_mask: torch.Tensor | None = None,
    teacher_coordinates: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
) -> torch.Tensor:
    """Mean squared error between matching hidden states, over real tokens, averaged over the layers.

    Each layer's error is divided by the teacher's mean square there, so every layer weighs alike whatever its scale.

    Args:
        student_hidden, teacher_hidden: ``output_hidden_states`` of both models, the same number of tensors of the
            same shapes ((batch, tokens, d) for text, (batch, channels, h, w) for images), unless
            ``teacher_coordinates`` maps the teacher's to the student's.
        attention_mask: (batch, tokens), 1 on real tokens; None counts every position.
        teacher_coordinates: per hidden state, (B, μ) to compare the student's with Bᵀ(y − μ) of the teacher's y (a
            narrowed residual stream's coordinates, `hidden_state_coordinates`), or None to compare them as they are.

    Returns:
        A scalar tensor (float32 or wider).

    Example:
        >>> h = (torch.ones(2, 3, 4), torch.ones(2, 3, 4))
        >>> float(hidden_state_loss(h, tuple(2 * x for x in h)))
        0.25
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"hidden_state_loss: the student has {len(student_hidden)} hidden states, the teacher "
                         f"{len(teacher_hidden)}; feature distillation needs the same depth.")
    if teacher_coordinates is not None and len(teacher_coordinates) != len(teacher_hidden):
        raise ValueError(f"hidden_state_loss: {len(teacher_coordinates)} coordinate maps for {len(teacher_hidden)} "
                         "hidden states.")
    losses = []
    for i, (s, t) in enumerate(zip(student_hidden, teacher_hidden, strict=True)):
        if teacher_coordinates is not None and teacher_coordinates[i] is not None:
            basis, mean = teacher_coordinates[i]
            t = _at_least_float32(t)
            t = (t - mean.to(t)) @ basis.to(t)
        if s.shape != t.shape:
            raise ValueError(f"hidden_state_loss: hidden state {i} is {tuple(s.shape)} in the student and "
                             f"{tuple(t.shape)} in the teacher.")
        s, t = _at_least_float32(s), _at_least_float32(t)
        if attention_mask is not None and s.dim() == 3:
            keep = attention_mask.to(torch.bool)
            s, t = s[keep], t[keep]
        losses.append(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12))
    return torch.stack(losses).mean()


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    mask_id: int,
    special_ids: list[int],
    probability: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A copy of ``input_ids`` with each real, non-special token replaced by ``mask_id`` with ``probability``.

    The inputs of the optional masked-copy distillation term: the teacher labels sentences the data does not hold.
    Padding (``attention_mask`` 0) and special tokens ([CLS], [SEP], ...) are never masked.

    Args:
        input_ids: (batch, tokens) token ids.
        attention_mask: (batch, tokens), 1 on real tokens; None: every token is real.
        mask_id: the tokenizer's mask token id.
        special_ids: ids that stay (``tokenizer.all_special_ids``).
        probability: chance of masking each eligible token, in [0, 1].
        generator: optional random generator, for reproducible masks.

    Returns:
        A new (batch, tokens) tensor; ``input_ids`` is left unchanged.

    Example:
        >>> ids = torch.tensor([[101, 7, 8, 102, 0]])
        >>> mask_tokens(ids, torch.tensor([[1, 1, 1, 1, 0]]), mask_id=103, special_ids=[0, 101, 102], probability=1.0)
        tensor([[101, 103, 103, 102,   0]])
    """
    eligible = ~torch.isin(input_ids, torch.as_tensor(special_ids, device=input_ids.device))
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    return input_ids.masked_fill(eligible & (draw < probability), mask_id)


@torch.no_grad()
def token_neighbours(embedding: torch.Tensor, candidates, k: int = 10, chunk: int = 1024) -> torch.Tensor:
    """For every candidate token, its ``k`` nearest other candidates in an input embedding (cosine of centred rows).

    The substitution table of `substitute_tokens`. Nearest in a trained embedding mostly means related words of the
    same kind (for MiniLM-L6: good → excellent, bad, great; boring → bored, dull, exciting), so a substituted copy
    stays a sentence the teacher can label, often with another sentiment.

    Args:
        embedding: the token embedding, (V, d).
        candidates: the token ids that may be swapped and swapped in (e.g. those of the training data, without
            special tokens); at least ``k + 1`` of them.
        k: neighbours per token.
        chunk: candidates compared at once (memory: chunk × len(candidates) floats).

    Returns:
        (V, k) token ids on ``embedding``'s device; the row of a token that is not a candidate holds the token
        itself, so it never changes.

    Example:
        >>> table = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
        >>> token_neighbours(table, [0, 1, 3], k=1).squeeze(1).tolist()
        [1, 0, 2, 0]
    """
    candidates = torch.as_tensor(candidates, dtype=torch.long, device=embedding.device)
    if candidates.numel() <= k:
        raise ValueError(f"token_neighbours needs more than k = {k} candidate tokens; got {candidates.numel()}.")
    unit = centred_unit_rows(embedding)[candidates]
    table = torch.arange(embedding.shape[0], device=embedding.device).unsqueeze(1).repeat(1, k)
    for start in range(0, candidates.numel(), chunk):
        similarity = unit[start:start + chunk] @ unit.T
        rows = torch.arange(similarity.shape[0], device=embedding.device)
        similarity[rows, rows + start] = -float("inf")  # a token is not its own neighbour
        table[candidates[start:start + chunk]] = candidates[similarity.topk(k, dim=1).indices]
    return table


@torch.no_grad()
def data_token_neighbours(model: nn.Module, dataset, tokenizer, k: int = 10) -> torch.Tensor:
    """`token_neighbours` over ``model``'s input embedding, among the tokens ``dataset`` uses (special ones left out).

    Args:
        model: the model whose input embedding (``get_input_embeddings()``: an ``nn.Embedding`` or a
            `LowRankEmbedding`) measures nearness; the teacher.
        dataset: the tokenized training data (``input_ids``): its words are the ones swapped and swapped in.
        tokenizer: supplies ``all_special_ids``.
        k: neighbours per token.

    Returns:
        The (V, k) table, on the embedding's device (where the batches it swaps tokens in live).
    """
    embedding = model.get_input_embeddings()
    if isinstance(embedding, nn.Embedding):
        table = embedding.weight
    else:  # a factored embedding: read every row through its forward
        table = embedding(torch.arange(embedding.num_embeddings, device=embedding.up.weight.device))
    special = set(tokenizer.all_special_ids)
    return token_neighbours(table, [i for i in token_ids_used(dataset) if i not in special], k)


def substitute_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    neighbours: torch.Tensor,
    special_ids: list[int],
    probability: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A copy of ``input_ids`` with each real, non-special token swapped, with ``probability``, for one of its
    neighbours (a row of ``neighbours``, drawn uniformly). Padding and special tokens never change.

    Args:
        input_ids: (batch, tokens) token ids.
        attention_mask: (batch, tokens), 1 on real tokens; None: every token is real.
        neighbours: (V, k) table of `token_neighbours`, on the device of ``input_ids``.
        special_ids: ids that stay (``tokenizer.all_special_ids``).
        probability: chance of swapping each eligible token, in [0, 1].
        generator: optional random generator (on the device of ``input_ids``).

    Returns:
        A new (batch, tokens) tensor; ``input_ids`` is left unchanged.
    """
    eligible = ~torch.isin(input_ids, torch.as_tensor(special_ids, device=input_ids.device))
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    pick = torch.randint(0, neighbours.shape[1], input_ids.shape, generator=generator, device=input_ids.device)
    swapped = neighbours[input_ids, pick]
    return torch.where(eligible & (draw < probability), swapped, input_ids)


def mask_tokenizer(*owners):
    """The first tokenizer with a mask token among ``owners`` (a tokenizer, a processor, a data collator holding one).

    Raises:
        ValueError: none has a mask token; the masked-copy term cannot run.
    """
    tokenizer = tokenizer_with("mask_token_id", *owners)
    if tokenizer is not None:
        return tokenizer
    raise ValueError("distillation_mask_prob > 0 needs a tokenizer with a mask token: pass processing_class=tokenizer "
                     "to the trainer (or a data collator that holds one).")


def masked_copy_loss(
    student: nn.Module,
    teacher: nn.Module,
    features: dict,
    tokenizer,
    *,
    probability: float,
    neighbours: torch.Tensor | None = None,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift_labels: bool = False,
) -> torch.Tensor:
    """``T²·KL(p_teacher^T ‖ p_student^T)`` on a copy of a text batch with some tokens masked (`mask_tokens`) or,
    given ``neighbours``, swapped for nearby tokens (`substitute_tokens`).

    The teacher labels inputs the data does not hold, as TinyBERT's augmentation does with word substitutions; the
    copy's labels are not used. Costs a second forward pass of both models and a second backward pass.

    Args:
        student, teacher: the models (the teacher runs under ``no_grad``).
        features: the batch's model inputs, without labels; needs ``input_ids``.
        tokenizer: supplies ``mask_token_id`` and ``all_special_ids`` (see `mask_tokenizer`).
        probability: chance of changing each real, non-special token.
        neighbours: the (V, k) table of `token_neighbours`; None masks instead.
        temperature, num_items_in_batch, shift_labels: as in `distillation_loss`.

    Returns:
        The scalar term, normalised like `distillation_loss`'s teacher term.
    """
    if "input_ids" not in features:
        raise ValueError("distillation_mask_prob > 0 needs text batches with input_ids; this batch has "
                         f"{sorted(features)}. Set distillation_mask_prob=0.")
    ids, attention = features["input_ids"], features.get("attention_mask")
    if neighbours is None:
        changed = mask_tokens(ids, attention, mask_id=tokenizer.mask_token_id, special_ids=tokenizer.all_special_ids,
                              probability=probability)
    else:
        changed = substitute_tokens(ids, attention, neighbours=neighbours, special_ids=tokenizer.all_special_ids,
                                    probability=probability)
    copy = {**features, "input_ids": changed, "output_hidden_states": False}
    return _teacher_term_on(student, teacher, copy, copy, temperature=temperature,
                            num_items_in_batch=num_items_in_batch, shift_labels=shift_labels)


def _teacher_term_on(student: nn.Module, teacher: nn.Module, student_inputs: dict, teacher_inputs: dict,
                     **loss_options) -> torch.Tensor:
    """The teacher term of `distillation_loss` (no labels) on inputs made for each model; a token-level output
    counts the positions the student's ``attention_mask`` calls real."""
    student_logits = student(**student_inputs).logits
    with torch.no_grad():
        teacher_logits = teacher(**teacher_inputs).logits
    token_level = student_logits.dim() == 3  # then padding must not count
    term, _, _ = distillation_loss(student_logits, teacher_logits, None, **loss_options,
                                   attention_mask=student_inputs.get("attention_mask") if token_level else None)
    return term


def mixup_inputs(model: nn.Module, features: dict, weight: torch.Tensor, partner: torch.Tensor) -> dict:
    """``model``'s inputs for the mixup of a batch: example i blended as ``w[i]·x_i + (1 − w[i])·x_partner[i]``.

    Text is blended in ``model``'s own input embedding (``inputs_embeds``; a token id cannot be blended), so a reduced
    embedding blends its own codes: teacher and student see the same mix of the same examples. A position is real if
    it is real in either example. Images are blended in pixel space.

    Args:
        model: the model that will read the inputs (its input embedding is used for text).
        features: the batch's model inputs, without labels: ``input_ids`` (text) or ``pixel_values`` (images).
        weight: (B,) blend weights w in [0, 1].
        partner: (B,) index of the example each one is blended with.

    Returns:
        The model inputs of the blended batch.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> images = {"pixel_values": torch.tensor([[0.0, 0.0], [1.0, 1.0]])}
        >>> mixup_inputs(nn.Identity(), images, torch.tensor([0.25, 1.0]), torch.tensor([1, 0]))["pixel_values"]
        tensor([[0.7500, 0.7500],
                [1.0000, 1.0000]])
    """
    mixed = {key: value for key, value in features.items() if key not in ("input_ids", "output_hidden_states")}
    if "input_ids" in features:
        embedding = getattr(model, "module", model).get_input_embeddings()  # a DDP wrapper holds it in .module
        inputs = embedding(features["input_ids"])
        key = "inputs_embeds"
    elif "pixel_values" in features:
        inputs, key = features["pixel_values"], "pixel_values"
    else:
        raise ValueError("distillation_mixup > 0 needs batches with input_ids (text) or pixel_values (images); this "
                         f"batch has {sorted(features)}. Set distillation_mixup=0.")
    blend = weight.to(inputs.dtype).view(-1, *[1] * (inputs.dim() - 1))
    mixed[key] = blend * inputs + (1 - blend) * inputs[partner]
    if features.get("attention_mask") is not None:
        mask = features["attention_mask"]
        mixed["attention_mask"] = torch.maximum(mask, mask[partner])
    return mixed


def mixup_copy_loss(
    student: nn.Module,
    teacher: nn.Module,
    features: dict,
    *,
    concentration: float,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift_labels: bool = False,
) -> torch.Tensor:
    """``T²·KL(p_teacher^T ‖ p_student^T)`` on a mixup of the batch (MixKD, Liang et al. 2021): each example blended
    with a random other one by a weight λ ~ Beta(c, c) (`mixup_inputs`).

    The teacher labels points between the training examples, which the data does not hold: the student learns the
    teacher's function there too ("function matching"). The copy's labels are not used. Costs a second forward pass
    of both models and a second backward pass.

    Args:
        student, teacher: the models (the teacher runs under ``no_grad``).
        features: the batch's model inputs, without labels (see `mixup_inputs`).
        concentration: c of Beta(c, c), > 0; small c keeps most blends close to one of the two examples.
        temperature, num_items_in_batch, shift_labels: as in `distillation_loss`.

    Returns:
        The scalar term, normalised like `distillation_loss`'s teacher term.
    """
    some = next(value for value in features.values() if isinstance(value, torch.Tensor))
    size = some.shape[0]
    partner = torch.randperm(size).to(some.device)
    weight = torch.distributions.Beta(float(concentration), float(concentration)).sample((size,)).to(some.device)
    return _teacher_term_on(student, teacher, mixup_inputs(student, features, weight, partner),
                            mixup_inputs(teacher, features, weight, partner), temperature=temperature,
                            num_items_in_batch=num_items_in_batch, shift_labels=shift_labels)


def teacher_copy(model: nn.Module) -> nn.Module:
    """A frozen snapshot of ``model`` to distil from: a deep copy in eval mode with no parameter requiring grad.

    Args:
        model: the model just before a cut (the bare module, not a DDP wrapper).

    Returns:
        The copy; it shares nothing with ``model``, so later surgery and optimizer steps leave it unchanged.
    """
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
