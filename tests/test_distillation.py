"""distillation_loss against hand-written formulas, masking, gradient-accumulation scaling and dtypes."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_inputs, tiny_model, tiny_tokenizer
from torch import nn
from transformers import DataCollatorWithPadding

from hf_rmtkd.distillation import (
    data_token_neighbours,
    distillation_loss,
    mask_tokenizer,
    mask_tokens,
    masked_copy_loss,
    mixup_copy_loss,
    mixup_inputs,
    substitute_tokens,
    teacher_copy,
    token_neighbours,
)
from hf_rmtkd.modeling.layers_rmtkd import LowRankEmbedding


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def logits(*shape, generator):
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * 2


def kl_by_hand(student, teacher, temperature=1.0):
    """Mean over rows of Σ_c p_t (log p_t − log p_s), the softmaxes at temperature T."""
    p_t = torch.softmax(teacher / temperature, -1)
    return (p_t * (p_t.log() - torch.log_softmax(student / temperature, -1))).sum(-1).mean()


def test_alpha_one_is_cross_entropy(generator):
    student, teacher = logits(8, 5, generator=generator), logits(8, 5, generator=generator)
    labels = torch.randint(0, 5, (8,), generator=generator)
    loss, ce, _ = distillation_loss(student, teacher, labels, alpha=1.0, temperature=2.0)
    torch.testing.assert_close(loss, F.cross_entropy(student, labels))
    torch.testing.assert_close(ce, F.cross_entropy(student, labels))


def test_alpha_zero_is_kl_by_hand(generator):
    student, teacher = logits(8, 5, generator=generator), logits(8, 5, generator=generator)
    labels = torch.randint(0, 5, (8,), generator=generator)
    loss, _, kl = distillation_loss(student, teacher, labels, alpha=0.0, temperature=1.0)
    torch.testing.assert_close(loss, kl_by_hand(student, teacher))
    torch.testing.assert_close(kl, kl_by_hand(student, teacher))


def test_default_mix(generator):
    student, teacher = logits(6, 3, generator=generator), logits(6, 3, generator=generator)
    labels = torch.randint(0, 3, (6,), generator=generator)
    loss, ce, kl = distillation_loss(student, teacher, labels)
    torch.testing.assert_close(loss, 0.7 * F.cross_entropy(student, labels) + 0.3 * kl_by_hand(student, teacher))
    torch.testing.assert_close(loss, 0.7 * ce + 0.3 * kl)


def test_kl_is_zero_when_student_equals_teacher(generator):
    student = logits(4, 7, 11, generator=generator)
    _, _, kl = distillation_loss(student, student.clone(), None, temperature=1.3)
    assert kl.abs().item() < 1e-12


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_softens_and_scales_by_t_squared(generator, temperature):
    student, teacher = logits(8, 5, generator=generator), logits(8, 5, generator=generator)
    labels = torch.randint(0, 5, (8,), generator=generator)
    loss, ce, kl = distillation_loss(student, teacher, labels, alpha=0.25, temperature=temperature)
    torch.testing.assert_close(kl, kl_by_hand(student, teacher, temperature))
    torch.testing.assert_close(ce, F.cross_entropy(student, labels))  # the task term stays at T = 1
    torch.testing.assert_close(loss, 0.25 * ce + 0.75 * temperature**2 * kl)


def test_without_labels_the_loss_is_the_kl_term(generator):
    student, teacher = logits(8, 5, generator=generator), logits(8, 5, generator=generator)
    loss, ce, kl = distillation_loss(student, teacher, None, alpha=0.7, temperature=2.0)
    assert ce is None
    torch.testing.assert_close(loss, 4.0 * kl_by_hand(student, teacher, 2.0))


def test_token_classification_masks_ignored_positions_from_both_terms(generator):
    student, teacher = logits(3, 6, 4, generator=generator), logits(3, 6, 4, generator=generator)
    labels = torch.randint(0, 4, (3, 6), generator=generator)
    labels[0, 4:] = -100
    labels[2, :2] = -100
    real = labels != -100
    loss, ce, kl = distillation_loss(student, teacher, labels)
    torch.testing.assert_close(ce, F.cross_entropy(student[real], labels[real]))
    torch.testing.assert_close(kl, kl_by_hand(student[real], teacher[real]))

    # Whatever the logits at ignored positions, the loss does not move.
    noisy_student, noisy_teacher = student.clone(), teacher.clone()
    noisy_student[~real] = 50 * logits(int((~real).sum()), 4, generator=generator)
    noisy_teacher[~real] = -50 * logits(int((~real).sum()), 4, generator=generator)
    torch.testing.assert_close(distillation_loss(noisy_student, noisy_teacher, labels)[0], loss)


def test_attention_mask_masks_unlabelled_padding(generator):
    student, teacher = logits(2, 5, 4, generator=generator), logits(2, 5, 4, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    _, _, kl = distillation_loss(student, teacher, None, attention_mask=mask)
    torch.testing.assert_close(kl, kl_by_hand(student[mask.bool()], teacher[mask.bool()]))


def test_causal_shift_predicts_the_next_token(generator):
    student, teacher = logits(2, 7, 10, generator=generator), logits(2, 7, 10, generator=generator)
    labels = torch.randint(0, 10, (2, 7), generator=generator)
    labels[1, 5:] = -100  # padding at the end of the second sequence
    loss, ce, kl = distillation_loss(student, teacher, labels, shift_labels=True)

    shifted_student, shifted_teacher, targets = student[:, :-1], teacher[:, :-1], labels[:, 1:]
    real = targets != -100
    torch.testing.assert_close(ce, F.cross_entropy(shifted_student.reshape(-1, 10), targets.reshape(-1)))
    torch.testing.assert_close(kl, kl_by_hand(shifted_student[real], shifted_teacher[real]))
    # The same as feeding pre-shifted tensors without the flag.
    torch.testing.assert_close(distillation_loss(shifted_student, shifted_teacher, targets)[0], loss)


def test_micro_batches_sum_to_the_whole_batch(generator):
    student, teacher = logits(4, 6, 9, generator=generator), logits(4, 6, 9, generator=generator)
    labels = torch.randint(0, 9, (4, 6), generator=generator)
    labels[0, 3:] = -100
    labels[3, 1:] = -100  # the micro-batches hold different numbers of real tokens
    num_items = (labels[:, 1:] != -100).sum()
    kwargs = {"shift_labels": True, "num_items_in_batch": num_items}

    whole = distillation_loss(student, teacher, labels, **kwargs)[0]
    first = distillation_loss(student[:1], teacher[:1], labels[:1], **kwargs)[0]
    rest = distillation_loss(student[1:], teacher[1:], labels[1:], **kwargs)[0]
    torch.testing.assert_close(first + rest, whole)
    # Without num_items_in_batch each batch is a mean over its own items, which is the same for the whole batch.
    torch.testing.assert_close(distillation_loss(student, teacher, labels, shift_labels=True)[0], whole)


def test_regression_uses_squared_errors(generator):
    student, teacher = logits(8, 1, generator=generator), logits(8, 1, generator=generator)
    labels = torch.randn(8, generator=generator, dtype=torch.float64)
    loss, mse_task, mse_teacher = distillation_loss(student, teacher, labels, alpha=0.6, temperature=3.0)
    torch.testing.assert_close(mse_task, F.mse_loss(student.squeeze(-1), labels))
    torch.testing.assert_close(mse_teacher, F.mse_loss(student, teacher))
    torch.testing.assert_close(loss, 0.6 * mse_task + 0.4 * mse_teacher)
    # Labels shaped like the logits, (B, 1), are accepted too.
    torch.testing.assert_close(distillation_loss(student, teacher, labels[:, None], alpha=0.6)[0], loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_give_a_float32_loss(generator, dtype):
    student = logits(2, 5, 50, generator=generator).to(dtype)
    teacher = logits(2, 5, 50, generator=generator).to(dtype)
    labels = torch.randint(0, 50, (2, 5), generator=generator)
    loss, ce, kl = distillation_loss(student, teacher, labels, shift_labels=True)
    assert loss.dtype == ce.dtype == kl.dtype == torch.float32
    reference = distillation_loss(student.float(), teacher.float(), labels, shift_labels=True)[0]
    torch.testing.assert_close(loss, reference)


def test_gradient_reaches_the_student_only(generator):
    student = logits(4, 3, generator=generator).requires_grad_()
    teacher = logits(4, 3, generator=generator).requires_grad_()
    labels = torch.randint(0, 3, (4,), generator=generator)
    loss, ce, kl = distillation_loss(student, teacher, labels)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert not ce.requires_grad and not kl.requires_grad


def test_all_positions_ignored_gives_a_zero_loss_with_a_gradient(generator):
    student = logits(2, 3, 4, generator=generator).requires_grad_()
    labels = torch.full((2, 3), -100)
    loss, _, _ = distillation_loss(student, logits(2, 3, 4, generator=generator), labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize(
    ("student_shape", "labels_shape", "kwargs", "message"),
    [
        ((4, 3), (4, 3), {}, "labels"),  # multi-label / soft labels
        ((2, 5, 7), (2, 5), {"shift_labels": False, "teacher_shape": (2, 5, 6)}, "shape"),
        ((4, 3), (4,), {"shift_labels": True}, "shift_labels"),
        ((4, 3), (4,), {"alpha": 1.5}, "alpha"),
        ((4, 3), (4,), {"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_inputs_are_refused(generator, student_shape, labels_shape, kwargs, message):
    teacher_shape = kwargs.pop("teacher_shape", student_shape)
    labels = torch.zeros(labels_shape, dtype=torch.long)
    student, teacher = logits(*student_shape, generator=generator), logits(*teacher_shape, generator=generator)
    with pytest.raises(ValueError, match=message):
        distillation_loss(student, teacher, labels, **kwargs)


def test_teacher_copy_is_frozen_and_independent():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    teacher = teacher_copy(model)
    assert model.training and not teacher.training
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        model[0].weight.zero_()
    assert teacher[0].weight.abs().sum() > 0


def test_hidden_state_loss_is_relative_per_layer_and_masks_padding():
    from hf_rmtkd.distillation import hidden_state_loss

    teacher = (torch.ones(2, 3, 4), 10 * torch.ones(2, 3, 4))
    student = (torch.zeros(2, 3, 4), 10 * torch.ones(2, 3, 4))
    assert float(hidden_state_loss(student, teacher)) == pytest.approx(0.5)  # layer errors 1 and 0, scale-free
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    padded = (torch.ones(2, 3, 4).index_put_((torch.tensor([0]), torch.tensor([2])), torch.tensor(99.0)),)
    assert float(hidden_state_loss(padded, (torch.ones(2, 3, 4),), mask)) == 0.0  # the differing token is padding
    with pytest.raises(ValueError, match="hidden state 0"):
        hidden_state_loss((torch.ones(2, 3, 4),), (torch.ones(2, 3, 5),))


SPECIAL = [0, 2, 3, 4]  # [PAD], [CLS], [SEP], [MASK]
NEIGHBOURS = torch.arange(30).unsqueeze(1) + torch.tensor([[100, 200]])  # token t may become t + 100 or t + 200
# How the copy changes a chosen token, and what a changed token must then be.
COPIES = {
    "mask": (lambda ids, attention, probability, generator: mask_tokens(
        ids, attention, mask_id=4, special_ids=SPECIAL, probability=probability, generator=generator),
        lambda before, after: torch.all(after == 4)),
    "neighbours": (lambda ids, attention, probability, generator: substitute_tokens(
        ids, attention, neighbours=NEIGHBOURS, special_ids=SPECIAL, probability=probability, generator=generator),
        lambda before, after: torch.all(torch.isin(after - before, torch.tensor([100, 200])))),
}


@pytest.mark.parametrize("copy", COPIES)
@pytest.mark.parametrize("probability", [0.0, 0.3, 1.0])
def test_the_copy_changes_only_real_non_special_tokens(copy, probability):
    change, is_changed_right = COPIES[copy]
    ids = torch.tensor([[2, 10, 11, 12, 13, 3, 0, 0], [2, 20, 21, 3, 0, 0, 0, 0]])
    attention = (ids != 0).long()
    copied = change(ids, attention, probability, torch.Generator().manual_seed(0))
    eligible = attention.bool() & ~torch.isin(ids, torch.tensor(SPECIAL))
    assert torch.equal(copied[~eligible], ids[~eligible])  # padding and special tokens stay
    changed = copied != ids
    assert is_changed_right(ids[changed], copied[changed])
    if probability == 0.0:
        assert not changed.any()
    if probability == 1.0:
        assert torch.equal(changed, eligible)
    assert ids[0, 1] == 10  # the input is not modified in place


def test_masked_copy_loss_is_the_teacher_term_on_a_masked_batch(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    student = tiny_model("bert").eval()
    batch = tiny_inputs("bert", batch=6, seq_len=10)
    assert masked_copy_loss(student, student, batch, tokenizer, probability=0.5) == 0  # a teacher like the student
    teacher = teacher_copy(student)
    with torch.no_grad():
        teacher.bert.embeddings.word_embeddings.weight[tokenizer.mask_token_id].mul_(-3)  # only [MASK] differs
    assert masked_copy_loss(student, teacher, batch, tokenizer, probability=0.0) == 0  # nothing masked
    assert masked_copy_loss(student, teacher, batch, tokenizer, probability=0.5) > 0
    with pytest.raises(ValueError, match="input_ids"):
        masked_copy_loss(student, teacher, {"attention_mask": batch["attention_mask"]}, tokenizer, probability=0.5)


# Three unit vectors and their negatives (mean zero): cos(a, b) = 0.8, cos(b, c) = 0.352, cos(a, c) = -0.28.
A, B, C = [1.0, 0.0], [0.8, 0.6], [-0.28, 0.96]
SIX = torch.tensor([A, B, C, [-x for x in A], [-x for x in B], [-x for x in C]])


@pytest.mark.parametrize(("candidates", "k", "expected"), [
    (range(6), 1, [[1], [0], [1], [4], [3], [4]]),                  # each token's nearest other token
    (range(6), 2, [[1, 5], [0, 2], [1, 3], [4, 2], [3, 5], [4, 0]]),
    ([0, 2, 3], 1, [[2], [1], [3], [2], [4], [5]]),                  # 1, 4, 5 are no candidates: they stay
])  # fmt: skip
def test_token_neighbours_are_the_nearest_other_candidates(candidates, k, expected):
    table = SIX + torch.tensor([5.0, -3.0])  # an offset the centring removes
    assert token_neighbours(table, list(candidates), k=k, chunk=2).tolist() == expected
    with pytest.raises(ValueError, match="more than k = 3"):
        token_neighbours(table, [0, 1, 2], k=3)


def test_data_token_neighbours_reads_the_data_s_words_through_any_embedding(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    model = tiny_model("bert")
    data = [{"input_ids": [2, 10, 11, 12, 3]}, {"input_ids": [2, 13, 14, 10, 3, 0]}]
    table = data_token_neighbours(model, data, tokenizer, k=2)
    words = [10, 11, 12, 13, 14]
    assert torch.all(torch.isin(table[words], torch.tensor(words)))  # swapped only for the data's other words
    assert torch.all(table[words] != torch.tensor(words).unsqueeze(1))
    others = [i for i in range(table.shape[0]) if i not in words]
    assert torch.equal(table[others], torch.tensor(others).unsqueeze(1).expand(-1, 2))  # specials stay themselves
    # A factored embedding that reproduces the table exactly gives the same neighbours.
    weight = model.get_input_embeddings().weight.detach()
    factored = LowRankEmbedding(weight.shape[0], weight.shape[1], rank=weight.shape[1])
    with torch.no_grad():
        factored.embed.weight.copy_(weight)
        factored.up.weight.copy_(torch.eye(weight.shape[1]))
        factored.up.bias.zero_()
    model.set_input_embeddings(factored)
    assert torch.equal(data_token_neighbours(model, data, tokenizer, k=2), table)


def test_masked_copy_loss_with_neighbours_is_the_teacher_term_on_a_substituted_batch(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    student = tiny_model("bert").eval()
    batch = tiny_inputs("bert", batch=6, seq_len=10)
    batch["input_ids"] = batch["input_ids"] % 45 + 5  # words 5..49 only
    teacher = teacher_copy(student)
    with torch.no_grad():
        teacher.bert.embeddings.word_embeddings.weight[50:].mul_(-3)  # only the swapped-in tokens differ
    neighbours = torch.arange(student.config.vocab_size).unsqueeze(1).clone()
    assert masked_copy_loss(student, teacher, batch, tokenizer, probability=1.0, neighbours=neighbours) == 0
    neighbours[:50] = 50 + torch.arange(50).unsqueeze(1)
    assert masked_copy_loss(student, teacher, batch, tokenizer, probability=0.0, neighbours=neighbours) == 0
    assert masked_copy_loss(student, teacher, batch, tokenizer, probability=1.0, neighbours=neighbours) > 0


def test_mask_tokenizer_finds_the_tokenizer_or_says_what_to_pass(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    collator = DataCollatorWithPadding(tokenizer)
    assert mask_tokenizer(None, collator) is tokenizer
    with pytest.raises(ValueError, match="processing_class"):
        mask_tokenizer(None, object())


@pytest.mark.parametrize("arch", ["bert", "resnet"])  # blended in the input embedding / in pixel space
def test_mixup_inputs_blend_each_example_with_its_partner(arch):
    model = tiny_model(arch).eval()
    batch = tiny_inputs(arch, batch=4)
    if "attention_mask" in batch:
        batch["attention_mask"][1, 5:] = 0  # example 1 is shorter: its blend is real where either example is
    partner = torch.tensor([1, 0, 3, 2])
    with torch.no_grad():
        plain = model(**batch).logits
        itself = model(**mixup_inputs(model, batch, torch.ones(4), partner)).logits
        swapped = model(**mixup_inputs(model, batch, torch.zeros(4), partner))
        half = mixup_inputs(model, batch, torch.full((4,), 0.5), partner)
    if "attention_mask" in batch:
        assert half["attention_mask"][:2].eq(1).all()
        # weight 1: the example itself, through the embedding as input_ids (but for example 1, whose blend with the
        # longer example 0 has real positions that it lacks)
        torch.testing.assert_close(itself[[0, 2, 3]], plain[[0, 2, 3]])
        return
    torch.testing.assert_close(itself, plain)  # weight 1: the example itself
    torch.testing.assert_close(swapped.logits, plain[partner])  # weight 0: the partner
    torch.testing.assert_close(half["pixel_values"], (batch["pixel_values"] + batch["pixel_values"][partner]) / 2)


@pytest.mark.parametrize("arch", ["bert", "resnet"])
def test_mixup_copy_loss_is_the_teacher_term_on_a_blended_batch(arch):
    student = tiny_model(arch).eval()
    batch = tiny_inputs(arch, batch=6)
    torch.manual_seed(0)
    assert mixup_copy_loss(student, student, batch, concentration=0.4) == 0  # a teacher like the student
    teacher = teacher_copy(student)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.mul_(1.5)
    term = mixup_copy_loss(student, teacher, batch, concentration=0.4)
    assert term > 0
    term.backward()
    assert all(p.grad is None for p in teacher.parameters())  # only the student learns
    embedding = student.get_input_embeddings() if arch == "bert" else None
    if embedding is not None:
        assert embedding.weight.grad is not None  # text is blended in the student's own embedding
    with pytest.raises(ValueError, match="input_ids .* or pixel_values"):
        mixup_copy_loss(student, teacher, {"attention_mask": torch.ones(2, 3)}, concentration=0.4)
