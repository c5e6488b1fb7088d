"""Model cards: the packaged template, every body section, the YAML metadata (parsed back offline), the embedded plots,
pipeline tags per head, and the fallbacks for a model loaded from disk."""

import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, metadata_load
from tiny_models import tiny_inputs, tiny_model

import hf_rmtkd
from hf_rmtkd import card as card_module
from hf_rmtkd.card import TEMPLATE_NAME, build_model_card, pipeline_tag_for, template_text
from hf_rmtkd.modeling import rmtkd_class_for

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG = [  # the shape of RMTKDTrainer.rmtkd_log entries
    {"round": 1, "sites": {"bert.encoder.layer.0.output.dense": {"kind": "ffn_width", "d": 64, "k": 27,
                                                                  "k_spectrum": 27}},
     "params_before": 24515, "params_after_cut": 22110, "eval_accuracy_after_cut": 0.61, "eval_accuracy": 0.83,
     "metric_drop": 0.004, "accepted": True, "params": 22110},
    {"round": 2, "sites": {"bert.encoder.layer.1.output.dense": {"kind": "ffn_width", "d": 64, "k": 3,
                                                                  "k_spectrum": 3}},
     "params_before": 22110, "params_after_cut": 18000, "eval_accuracy_after_cut": 0.4, "eval_accuracy": 0.7,
     "metric_drop": 0.134, "accepted": False, "params": 22110},
]


@pytest.fixture(scope="module")
def small():
    batches = [tiny_inputs("bert", batch=8, seq_len=16, seed=s) for s in range(4)]
    return hf_rmtkd.compress(tiny_model("bert"), batches, min_rank=2, progress=False)


@pytest.fixture(scope="module")
def folder(small, tmp_path_factory):
    """A checkpoint folder with weights and plots, as the card expects to sit in."""
    path = tmp_path_factory.mktemp("card")
    small.save_pretrained(path)
    small.rmtkd_report.plot(path / "spectra")
    return path


@pytest.fixture(scope="module")
def card(small, folder):
    return build_model_card(
        small, save_directory=folder, base_model="google/bert_uncased_L-2_H-128_A-2", datasets=["rotten_tomatoes"],
        eval_split="test", metric_before=0.85, metric_after=0.83, speed_ratio=1.734,
        speed_setup="batch 32 x 128 tokens, 1 thread", settings={"distillation_alpha": 0.7,
                                                                 "distillation_temperature": 2.0},
        rmtkd_log=LOG, model_id="me/tiny-rmtkd",
    )


def section(text: str, title: str) -> str:
    """The body of the markdown section ``## title`` (up to the next ``## ``)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"section '{title}' missing"
    return match.group(1)


def test_packaged_template_is_the_repository_template():
    packaged = REPO_ROOT / "src" / "hf_rmtkd" / "templates" / TEMPLATE_NAME
    assert (REPO_ROOT / "model_cards" / TEMPLATE_NAME).read_bytes() == packaged.read_bytes()
    assert template_text() == packaged.read_text(encoding="utf-8")


def test_summary_section(card, small):
    summary = section(card.text, "Summary")
    before, after = tiny_model("bert").num_parameters(), small.num_parameters()
    assert f"| Parameters | {before:,} | {after:,} | {(after - before) / before:+.1%} |" in summary
    assert re.search(r"\| Weights file \(safetensors\) \| \| \d+\.\d kB \|", summary)
    assert "1.73× faster (measured)" in summary and "batch 32 x 128 tokens" in summary
    assert "| accuracy | 0.85 | 0.83 | -0.02 |" in summary


def test_site_table(card, small):
    table = section(card.text, "Per-site spectra and cuts")
    cuts = {cut.site: cut for cut in small.rmtkd_plan.cuts}
    for site in small.rmtkd_report.sites:
        row = next(line for line in table.splitlines() if line.startswith(f"| `{site.name}` |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        cut = cuts.get(site.name)
        assert cells[1] == site.role
        assert cells[2] == (cut.kind if cut else "not cut")
        assert cells[3].startswith(f"{site.d} → {cut.rank if cut else site.d}")
        assert cells[4:] == [f"{site.outliers.sigma2:.4g}", f"{site.outliers.lambda_plus:.4g}",
                             f"{site.outliers.retained_variance:.1%}"]


def test_plots_are_embedded_with_relative_links(card, folder):
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section(card.text, "Spectra"))
    pngs = sorted(p.relative_to(folder).as_posix() for p in (folder / "spectra").glob("*.png"))
    assert sorted(links) == pngs and len(pngs) > 1
    assert links[0] == "spectra/summary.png"
    assert all((folder / link).is_file() and not Path(link).is_absolute() for link in links)


def test_usage_settings_log_and_citation(card):
    usage = section(card.text, "How to use")
    assert "import hf_rmtkd" in usage
    assert 'AutoModelForSequenceClassification.from_pretrained("me/tiny-rmtkd")' in usage
    assert 'from_pretrained("me/tiny-rmtkd", trust_remote_code=True)' in usage
    settings = section(card.text, "Settings")
    for text in ("σ² estimator | `mp_fit`", "τ (quantile that starts the σ² fit) | 0.5", "`tracy_widom`",
                 "centring", "effective samples", "α (weight of the cross-entropy term) | 0.7",
                 "T (distillation temperature) | 2"):
        assert text in settings
    rounds = section(card.text, "Compression rounds")
    assert "| 1 | 1 (ffn_width ×1) | 24,515 → 22,110 | 0.61 | 0.83 | 0.004 | yes |" in rounds
    assert "no (rolled back)" in rounds and "eval_accuracy after distillation" in rounds
    citation = section(card.text, "Citation")
    for text in ("Ettori", "Darabi", "Senthilkumar", "Trivedi", "arXiv:2509.15724", "2025",
                 "Random Matrix Theoretic Causal Knowledge Distillation"):
        assert text in citation


def test_metadata_parses_back(card, tmp_path):
    path = tmp_path / "README.md"
    card.save(path)
    meta = metadata_load(path)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-classification"
    assert meta["base_model"] == "google/bert_uncased_L-2_H-128_A-2"
    assert meta["datasets"] == ["rotten_tomatoes"]
    assert {"hf_rmtkd", "rmt-kd", "compression"} <= set(meta["tags"])
    [entry] = meta["model-index"]
    assert entry["name"] == "tiny-rmtkd"
    [result] = entry["results"]
    assert result["task"]["type"] == "text-classification"
    assert result["dataset"] == {"name": "rotten_tomatoes", "type": "rotten_tomatoes", "split": "test"}
    assert {(m["name"], m["value"]) for m in result["metrics"]} == {("accuracy", 0.83),
                                                                    ("accuracy (before RMT-KD)", 0.85)}
    loaded = ModelCard.load(path)  # a local file: parsed offline, model-index turned back into EvalResults
    assert sorted(r.metric_value for r in loaded.data.eval_results) == [0.83, 0.85]
    assert loaded.data.to_dict() == card.data.to_dict()


@pytest.mark.parametrize(
    "arch, head, tag",
    [
        ("bert", "sequence_classification", "text-classification"),
        ("bert", "token_classification", "token-classification"),
        ("bert", "masked_lm", "fill-mask"),
        ("bert", "base", "feature-extraction"),
        ("vit", "image_classification", "image-classification"),
        ("vit", "base", "image-feature-extraction"),
        ("llama", "causal_lm", "text-generation"),
    ],
)
def test_pipeline_tag_per_head(arch, head, tag):
    base = tiny_model(arch, head)
    model = rmtkd_class_for(base).from_base(base, {})
    assert pipeline_tag_for(model) == tag
    assert yaml.safe_load(build_model_card(model).content.split("---")[1])["pipeline_tag"] == tag


def test_card_of_a_reloaded_model_without_extras(small, folder):
    """A model loaded from disk has no report: the site table comes from the config's spectral summary."""
    reloaded = type(small).from_pretrained(folder)
    text = build_model_card(reloaded).content
    meta = yaml.safe_load(text.split("---")[1])
    assert "model-index" not in meta and "base_model" not in meta
    assert "not measured" in text and "## Spectra" not in text and "## Compression rounds" not in text
    table = section(text, "Per-site spectra and cuts")
    assert all(f"`{name}`" in table for name in small.rmtkd_report.names)
    assert 'from_pretrained("path/to/this/model")' in text
    assert "σ² estimator | `mp_fit`" in section(text, "Settings")


def test_slower_model_is_called_slower(small):
    assert "1.25× slower (measured)" in build_model_card(small, speed_ratio=0.8).content


def test_stock_export_paragraph(small, monkeypatch):
    given = build_model_card(small, stock_export="me/tiny-stock").content
    assert 'from_pretrained("me/tiny-stock")' in given and "BertForSequenceClassification" in given
    assert "needs the plugin" in build_model_card(small).content
    monkeypatch.setattr(card_module, "can_export_stock", lambda model: True)
    assert "export_stock(model" in build_model_card(small).content


def test_rejects_a_model_that_is_not_compressed():
    with pytest.raises(TypeError, match="compress it first"):
        build_model_card(tiny_model("bert"))


def test_site_cut_in_an_earlier_round_shows_its_width_before_the_cut(small):
    """The last report measured an earlier-cut FFN already narrowed; the card shows the width the cut started from."""
    site = next(s for s in small.rmtkd_report.sites if s.role == "ffn_inner")
    installed = small.config.reductions[site.name]["width"]
    log = [{"round": 1, "accepted": True,
            "sites": {site.name: {"kind": "ffn_width", "d": 999, "k": installed, "k_spectrum": installed - 1}}}]
    rows = {row["name"]: row for row in card_module._site_rows(small, small.rmtkd_report, log)}
    assert rows[site.name]["cut"] == f"999 → {installed} (spectrum: {installed - 1})"
    rolled_back = [{**log[0], "accepted": False}]
    rows = {row["name"]: row for row in card_module._site_rows(small, small.rmtkd_report, rolled_back)}
    assert rows[site.name]["cut"].startswith(f"{site.d} → {installed}")
