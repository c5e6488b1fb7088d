"""SpectralReport: JSON round trip, table, summary, lookup and plots, on synthetic spiked spectra."""

import json

import pytest
import torch

from hf_rmtkd.plots import plot_site, site_file_name
from hf_rmtkd.report import SiteSpectrum, SpectralReport
from hf_rmtkd.spectrum import CovarianceAccumulator

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_site(name, role, layer, d=32, n=2000, spikes=3, seed=0):
    """A site whose activations are white noise plus ``spikes`` strong directions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, :spikes] *= 8.0
    acc = CovarianceAccumulator(d, name)
    acc.update(x)
    return SiteSpectrum.from_accumulator(name, acc, role=role, layer=layer, n_sequences=n // 20)


@pytest.fixture(scope="module")
def report():
    sites = [synthetic_site("bert.embeddings.word_embeddings", "embedding", -1, seed=0)]
    for layer in range(2):
        sites.append(synthetic_site(f"bert.encoder.layer.{layer}.intermediate.dense", "ffn_in", layer, seed=1 + layer))
        sites.append(
            synthetic_site(f"bert.encoder.layer.{layer}.output.dense", "ffn_inner", layer, d=64, spikes=5, seed=9)
        )
    return SpectralReport(sites, settings={"estimator": "mp_fit", "quantile": 0.5, "centre": True}, model_name="toy")


def test_site_spectrum_finds_the_spikes(report):
    site = report["bert.encoder.layer.0.output.dense"]
    assert (site.d, site.n, site.n_sequences, site.k) == (64, 2000, 100, 5)
    assert site.eigenvalues == sorted(site.eigenvalues, reverse=True)
    assert site.centred and 0.0 < site.outliers.retained_variance < 1.0


def test_site_spectrum_rejects_wrong_eigenvalue_count():
    site = synthetic_site("a", "linear", 0, d=8)
    with pytest.raises(ValueError, match="'a'.*7 eigenvalues"):
        SiteSpectrum("a", "linear", 0, 8, 10, 1, site.eigenvalues[:7], site.outliers)


def test_effective_samples_sequences_uses_sequence_count():
    acc = CovarianceAccumulator(16)
    acc.update(torch.randn(1000, 16))
    site = SiteSpectrum.from_accumulator("s", acc, n_sequences=50, effective_samples="sequences")
    assert site.n == 1000 and site.outliers.n_samples == 50
    with pytest.raises(ValueError, match="effective_samples"):
        SiteSpectrum.from_accumulator("s", acc, effective_samples="pixels")


def test_json_round_trip_is_exact_and_atomic(report, tmp_path):
    path = tmp_path / "sub" / "rmtkd_report.json"
    path.parent.mkdir()
    path.write_text("stale")
    assert report.to_json(path) == path
    assert list(path.parent.iterdir()) == [path]  # the temporary file was renamed over the old one
    loaded = SpectralReport.from_json(path)
    assert loaded == report
    assert loaded["bert.encoder.layer.1.output.dense"].outliers == report["bert.encoder.layer.1.output.dense"].outliers


def test_json_settings_accept_common_types(report, tmp_path):
    extra = SpectralReport(report.sites[:1], settings={"path": tmp_path, "scale": torch.tensor(2.0)})
    loaded = SpectralReport.from_json(extra.to_json(tmp_path / "r.json"))
    assert loaded.settings == {"path": str(tmp_path), "scale": 2.0}


def test_failed_write_keeps_the_old_report(report, tmp_path):
    path = report.to_json(tmp_path / "r.json")
    before = path.read_text()
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        SpectralReport(report.sites, settings={"bad": object()}).to_json(path)
    assert path.read_text() == before and list(tmp_path.iterdir()) == [path]


def test_from_json_rejects_other_files(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="Not an hf_rmtkd spectral report"):
        SpectralReport.from_json(path)


def test_lookup_length_and_iteration(report):
    assert len(report) == 5
    assert [site.name for site in report] == report.names
    assert report[0].role == "embedding"
    with pytest.raises(KeyError, match="bert.encoder.layer.0.output.dense"):
        report["nope"]


def test_table_has_a_row_per_site(report):
    lines = report.table().splitlines()
    assert lines[0].split() == ["site", "role", "d", "n", "sigma2", "lambda+", "k", "k/d", "retained"]
    assert len(lines) == 2 + len(report)
    for line, site in zip(lines[2:], report, strict=True):
        cells = line.split()
        assert cells[0] == site.name and cells[1] == site.role and int(cells[6]) == site.k
    assert len({len(line) for line in lines[:2]}) == 1  # fixed width


def test_summary_is_json_and_has_no_eigenvalues(report):
    summary = json.loads(json.dumps(report.summary()))
    assert summary["model_name"] == "toy" and summary["settings"]["quantile"] == 0.5
    site = summary["sites"]["bert.encoder.layer.0.output.dense"]
    assert site["k"] == 5 and site["d"] == 64 and site["keep_ratio"] == pytest.approx(5 / 64)
    assert {"sigma2", "lambda_plus", "threshold", "retained_variance", "role", "layer"} <= set(site)
    assert "eigenvalues" not in json.dumps(summary)


def test_plot_writes_one_png_per_site_and_a_summary(report, tmp_path):
    paths = report.plot(tmp_path / "spectra")
    assert [p.name for p in paths] == [f"{name}.png" for name in report.names] + ["summary.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_file_names_are_safe_and_distinct(report, tmp_path):
    assert site_file_name("model.layers.0/mlp:up proj") == "model.layers.0_mlp_up_proj"
    site = report[1]
    clash = SpectralReport([site, SiteSpectrum(**{**site.__dict__, "name": "a b"}),
                            SiteSpectrum(**{**site.__dict__, "name": "a:b"})])
    assert [p.name for p in clash.plot(tmp_path)][1:] == ["a_b.png", "a_b_2.png", "summary.png"]


def test_plot_site_handles_rank_deficient_spectra(tmp_path):
    acc = CovarianceAccumulator(48)
    acc.update(torch.randn(20, 48, dtype=torch.float64))  # n < d: most eigenvalues are zero
    with pytest.warns(UserWarning, match="n < d"):
        site = SiteSpectrum.from_accumulator("short", acc, n_sequences=20)
    assert plot_site(site, tmp_path / "short.png").read_bytes()[:8] == PNG_MAGIC
