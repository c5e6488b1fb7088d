"""Embedding folding (`hf_rmtkd.fold_embeddings`): same outputs, no full-width activation, loads back, clear errors.

Table-driven over the encoders a user would fold: a BERT narrowed by the residual kind with a factored token
embedding, one with the library's other kinds cut inside the narrowed layers too, one with codes stored for the
calibration vocabulary only (a token -> row table); a RoBERTa (positions counted after padding) and a DistilBERT
(no token types, its own call).
"""

import pytest
import torch
import transformers
from tiny_models import tiny_inputs, tiny_model

import hf_rmtkd
from hf_rmtkd.embedding_folding import can_fold_embeddings
from hf_rmtkd.modeling import FoldedEmbeddings, ModulePathError, RMTKDConfig
from hf_rmtkd.modeling.layers_rmtkd import apply_reduction_map
from hf_rmtkd.plan import DEFAULT_KINDS

EMBEDDINGS = "bert.embeddings"
PADDING = {"bert": 0, "roberta": 1, "distilbert": 0}  # the tiny configs' pad_token_id


def _calibration(arch="bert"):
    return [tiny_inputs(arch, seed=seed) for seed in range(4)]


def _with_trained_embeddings(model):
    """Position and token-type embeddings and a norm of a trained model's size (fresh ones are almost zero)."""
    generator = torch.Generator().manual_seed(5)
    embeddings = model.base_model.embeddings
    tables = [embeddings.position_embeddings.weight]
    if hasattr(embeddings, "token_type_embeddings"):
        tables.append(embeddings.token_type_embeddings.weight)
    with torch.no_grad():
        for table in tables:
            table.copy_(torch.randn(table.shape, generator=generator))
        embeddings.LayerNorm.weight.copy_(torch.rand(embeddings.LayerNorm.weight.shape, generator=generator) + 0.5)
        embeddings.LayerNorm.bias.copy_(torch.randn(embeddings.LayerNorm.bias.shape, generator=generator))
    return model.eval()


def narrowed(arch="bert", **options):
    model = _with_trained_embeddings(tiny_model(arch))
    return hf_rmtkd.compress(model, _calibration(arch), min_rank=2, progress=False, **options).eval()


def _calibration_vocabulary():
    return sorted({int(token) for batch in _calibration() for token in batch["input_ids"].flatten()})


CASES = {
    "residual_and_embedding": ("bert", lambda: narrowed(kinds=("residual", "embedding"))),
    "every_kind": ("bert", lambda: narrowed(kinds=("residual", *DEFAULT_KINDS))),
    "kept_vocabulary": ("bert", lambda: narrowed(kinds=("residual", "embedding"),
                                                 vocabulary=_calibration_vocabulary())),
    "roberta": ("roberta", lambda: narrowed("roberta", kinds=("residual", "embedding"))),
    "distilbert": ("distilbert", lambda: narrowed("distilbert", kinds=("residual", "embedding"))),
}


def _inputs(arch):
    """Token ids with padding at the end of one row (RoBERTa numbers positions around it), and random token types."""
    inputs = tiny_inputs(arch, batch=3, seed=11)
    inputs["input_ids"][0, -3:] = PADDING[arch]
    inputs["attention_mask"][0, -3:] = 0
    if arch != "distilbert":
        types = torch.randint(0, 2, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(1))
        inputs["token_type_ids"] = types
    return inputs


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """case -> the model's outputs before folding, the folded model and its outputs, and its checkpoint."""
    items = {}
    for case, (arch, build) in CASES.items():
        model = build()
        with torch.no_grad():
            reference = model(**_inputs(arch), output_hidden_states=True)
        foldable = can_fold_embeddings(model)
        result = hf_rmtkd.fold_embeddings(model)
        with torch.no_grad():
            output = result(**_inputs(arch), output_hidden_states=True)
        directory = tmp_path_factory.mktemp(case)
        result.save_pretrained(directory)
        items[case] = {"reference": reference, "output": output, "model": result, "dir": directory, "arch": arch,
                       "foldable": foldable}
    return items


@pytest.mark.parametrize("case", CASES)
def test_folding_keeps_the_outputs(folded, case):
    item = folded[case]
    torch.testing.assert_close(item["output"].hidden_states[0], item["reference"].hidden_states[0],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(item["output"].logits, item["reference"].logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_the_fold_is_recorded_and_holds_nothing_full_width(folded, case):
    assert folded[case]["foldable"]
    model = folded[case]["model"]
    path = f"{folded[case]['arch']}.embeddings"
    embeddings = model.model.get_submodule(path)
    assert isinstance(embeddings, FoldedEmbeddings)
    entry = model.config.reductions[path]
    assert entry["kind"] == "folded_embeddings"
    assert entry["rows"] == (None if case != "kept_vocabulary" else embeddings.word_embeddings.num_embeddings)
    hidden = model.model.config.hidden_size
    assert folded[case]["output"].hidden_states[0].shape[-1] == entry["width"] < hidden
    assert all(hidden not in p.shape for p in embeddings.parameters()) or entry["rank"] == hidden
    assert not any(p.requires_grad for name, p in embeddings.named_parameters() if name != "word_embeddings.weight")


@pytest.mark.parametrize("case", CASES)
def test_the_folded_checkpoint_loads_back(folded, case):
    item = folded[case]
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(item["dir"]).eval()
    assert loaded.config.reductions == item["model"].config.reductions
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_inputs(item["arch"])).logits, item["reference"].logits, atol=1e-5,
                                   rtol=1e-5)


def test_an_entry_is_installed_after_the_cuts_it_folds(folded):
    """config.json sorts keys, so the fold ("bert.embeddings") comes before the entries it needs."""
    model = folded["every_kind"]["model"]
    reductions = dict(sorted(model.config.reductions.items()))
    config = RMTKDConfig(base_config=model.config.base_config, reductions=reductions)
    with torch.device("meta"):
        rebuilt = type(model)(config)
    assert {n: t.shape for n, t in rebuilt.state_dict().items()} == {n: t.shape for n, t in model.state_dict().items()}


def test_inputs_embeds_are_refused_by_name(folded):
    model = folded["residual_and_embedding"]["model"]
    with pytest.raises(ValueError, match="FoldedEmbeddings reads token ids"):
        model(inputs_embeds=torch.zeros(1, 4, model.model.config.hidden_size))


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: tiny_model("bert"), "expected an RMT-KD model"),
        (lambda: narrowed(kinds=("embedding",)), "does not start a narrowed stream; the fold needs the residual kind"),
        (lambda: narrowed(kinds=("residual",)), "the fold needs the token embedding factored"),
        (lambda: hf_rmtkd.compress(tiny_model("resnet"), [tiny_inputs("resnet", batch=8, seed=s) for s in range(4)],
                                   kinds=("ffn_width",), min_rank=2, progress=False),
         "folds the embeddings of post-LayerNorm encoders"),
    ],
)
def test_a_model_without_what_the_fold_needs_is_refused(build, message):
    model = build()
    assert not can_fold_embeddings(model)
    with pytest.raises(ValueError, match=message):
        hf_rmtkd.fold_embeddings(model)


def test_a_folded_model_cannot_be_folded_again(folded):
    model = folded["residual_and_embedding"]["model"]
    assert not can_fold_embeddings(model)
    with pytest.raises(ValueError, match="fold_embeddings: 'bert.embeddings' is folded already"):
        hf_rmtkd.fold_embeddings(model)


def test_a_folded_embeddings_entry_on_unreduced_embeddings_names_the_module():
    with pytest.raises(ModulePathError, match="folded_embeddings 'bert.embeddings': needs embeddings whose "
                                              "'word_embeddings' is a LowRankEmbedding"):
        apply_reduction_map(tiny_model("bert"), {EMBEDDINGS: {"kind": "folded_embeddings", "rank": 4, "width": 5}})


def test_an_entry_that_disagrees_with_the_model_names_the_field(folded):
    model = folded["residual_and_embedding"]["model"]
    entry = model.config.reductions[EMBEDDINGS]
    reductions = {path: e for path, e in model.config.reductions.items() if path != EMBEDDINGS}
    base = tiny_model("bert")
    apply_reduction_map(base, reductions)
    with pytest.raises(ValueError, match=f"the entry's rank {entry['rank'] + 1}, width"):
        apply_reduction_map(base, {EMBEDDINGS: {**entry, "rank": entry["rank"] + 1}})
