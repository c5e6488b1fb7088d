"""Embedding codes stored for the tokens the training data uses only (``embedding_vocabulary="train"``)."""

import datasets
import pytest
import torch
from tiny_models import VOCAB_SIZE, site_statistics, tiny_inputs, tiny_model, tiny_tokenizer
from transformers import DataCollatorWithPadding

import hf_rmtkd
from hf_rmtkd.architectures import find_sites
from hf_rmtkd.calibration import collect_statistics, measure_sites
from hf_rmtkd.modeling import LowRankEmbedding
from hf_rmtkd.plan import plan_reductions
from hf_rmtkd.reductions import apply_embedding, embedding_parameters, token_ids_used
from hf_rmtkd.reductions.embedding import nearest_kept_rows
from hf_rmtkd.trainer import RMTKDTrainer
from hf_rmtkd.training_args import RMTKDTrainingArguments

PATH = "bert.embeddings.word_embeddings"


def identity(d):
    return torch.eye(d)


@pytest.mark.parametrize("as_dataset", [True, False])
def test_token_ids_used_lists_each_id_once(as_dataset):
    rows = [{"input_ids": [2, 9, 7, 3]}, {"input_ids": [2, 7, 7, 3, 0]}]
    data = datasets.Dataset.from_list(rows) if as_dataset else rows
    assert token_ids_used(data) == [0, 2, 3, 7, 9]


def test_token_ids_used_names_a_missing_column():
    with pytest.raises(ValueError, match="'input_ids' column.*text"):
        token_ids_used(datasets.Dataset.from_dict({"text": ["not tokenized"]}))


def test_nearest_kept_rows_maps_kept_tokens_to_themselves_and_others_to_their_neighbour():
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(10, 16, generator=generator, dtype=torch.float64)
    kept = torch.tensor([1, 4, 6])
    table[8] = 3 * table[4] + 1e-3 * torch.randn(16, generator=generator, dtype=torch.float64)  # near token 4
    rows = nearest_kept_rows(table, kept)
    assert rows.dtype == torch.int32 and rows.shape == (10,)
    assert rows[kept].tolist() == [0, 1, 2]
    assert rows[8] == 1  # the row of token 4


def test_kept_tokens_are_exact_at_full_rank_and_others_read_their_neighbours_code():
    model, inputs = tiny_model("bert").eval(), tiny_inputs("bert", batch=2, seq_len=6)
    reference = model.get_input_embeddings().weight.detach().clone()
    kept = list(range(0, VOCAB_SIZE, 2))
    expected = model.num_parameters() - VOCAB_SIZE * 32 + embedding_parameters(len(kept), 32, 32)
    mean = site_statistics(model, PATH, inputs, "embedding")["mean"]
    new = apply_embedding(model, PATH, identity(32), mean, tokens=kept)
    assert isinstance(new, LowRankEmbedding) and (new.rows, new.num_embeddings) == (len(kept), VOCAB_SIZE)
    assert model.num_parameters() == expected
    ids = torch.arange(VOCAB_SIZE)
    with torch.no_grad():
        out = new(ids)
    torch.testing.assert_close(out[kept], reference[kept].to(out), atol=1e-5, rtol=0)
    neighbours = torch.tensor(kept)[nearest_kept_rows(reference.double(), torch.tensor(kept)).long()]
    torch.testing.assert_close(out, out[neighbours], atol=0, rtol=0)  # an unseen token reads a kept token's code
    assert not torch.equal(neighbours, ids)


def test_tokens_out_of_the_vocabulary_are_refused_by_name():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=f"{PATH}.*tokens"):
        apply_embedding(model, PATH, identity(32), tokens=[0, VOCAB_SIZE])


def test_the_planner_counts_only_the_stored_codes():
    model, inputs = tiny_model("bert"), [tiny_inputs("bert", batch=8, seed=seed) for seed in range(2)]
    sites = [site for site in find_sites(model) if site.name == PATH]
    measurements = measure_sites(collect_statistics(model, inputs, sites, progress=False), sites)
    whole = plan_reductions(measurements, model, kinds=["embedding"], min_rank=4)
    kept = list(range(40))
    trimmed = plan_reductions(measurements, model, kinds=["embedding"], min_rank=4, vocabulary=kept)
    (cut_whole,), (cut_trimmed,) = whole.cuts, trimmed.cuts
    assert cut_whole.params_after - cut_trimmed.params_after == (VOCAB_SIZE - len(kept)) * cut_whole.rank
    assert trimmed.reduction_map()[PATH] == {"kind": "embedding", "rank": cut_whole.rank, "rows": len(kept)}
    assert "rows" not in whole.reduction_map()[PATH]
    with pytest.raises(ValueError, match=PATH):
        plan_reductions(measurements, model, kinds=["embedding"], vocabulary=[-1, 3])


def test_trainer_keeps_the_training_vocabulary_and_the_result_reloads(tmp_path):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (64, 10), generator=generator)  # the data uses 55 of the 128 ids
    train = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                        "labels": (ids[:, 0] % 2).tolist()})
    tokenizer = tiny_tokenizer(tmp_path)
    args = RMTKDTrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=16, report_to=[], save_strategy="no",
        disable_tqdm=True, use_cpu=True, reduction_kinds=["embedding"], embedding_vocabulary="train", min_rank=4,
        max_rounds=1, distillation_steps_per_round=1, max_metric_drop=1.0)
    trainer = RMTKDTrainer(model=tiny_model("bert"), args=args, train_dataset=train, eval_dataset=train,
                           data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    stored = len(set(ids.flatten().tolist()) | set(tokenizer.all_special_ids))
    assert trainer.rmtkd_log[0]["sites"][PATH]["rows"] == stored
    assert trainer.model.config.reductions[PATH]["rows"] == stored
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = hf_rmtkd.RMTKDForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    batch = {"input_ids": torch.arange(VOCAB_SIZE).reshape(8, 16), "attention_mask": torch.ones(8, 16, dtype=int)}
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trainer.model(**batch).logits)


def test_compress_takes_the_vocabulary_too():
    model, inputs = tiny_model("bert"), [tiny_inputs("bert", batch=8, seed=seed) for seed in range(2)]
    kept = token_ids_used([{"input_ids": batch["input_ids"].flatten().tolist()} for batch in inputs])
    small = hf_rmtkd.compress(model, inputs, kinds=["embedding"], min_rank=4, vocabulary=kept, progress=False)
    assert small.config.reductions[PATH]["rows"] == len(kept) < VOCAB_SIZE
    assert small.get_submodule(f"model.{PATH}").rows == len(kept)
