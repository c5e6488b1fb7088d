"""Checkpoint folders and Hub pushes: every file written, reloadable, atomic replacement, failures that leave the old
folder intact, and uploads (captured offline) that hold exactly the expected files and never the access token."""

import hashlib
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_api
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from tiny_models import tiny_inputs, tiny_model
from transformers import AutoModelForSequenceClassification, BertTokenizer

import hf_rmtkd
from hf_rmtkd import hub
from hf_rmtkd.checkpoint import save_rmtkd_checkpoint
from hf_rmtkd.hub import push_model, push_rmtkd_checkpoint
from hf_rmtkd.report import SpectralReport

SECRET = "hf_fake_secret_token_123"
CODE_FILES = {"configuration_rmtkd.py", "modeling_rmtkd.py", "layers_rmtkd.py"}
LOG = [{"round": 1, "sites": {}, "params_before": 24515, "params_after_cut": 20000, "eval_accuracy_after_cut": 0.6,
        "eval_accuracy": 0.8, "metric_drop": 0.01, "accepted": True, "params": 20000}]


@pytest.fixture(scope="module")
def small():
    batches = [tiny_inputs("bert", batch=8, seq_len=16, seed=s) for s in range(4)]
    return hf_rmtkd.compress(tiny_model("bert"), batches, min_rank=2, progress=False)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]) + "\n")
    return BertTokenizer(vocab_file=str(vocab))


@pytest.fixture(scope="module")
def saved(small, tokenizer, tmp_path_factory):
    """One full checkpoint (the plots make it the slow fixture), saved with a token in the environment."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", SECRET)
        return save_rmtkd_checkpoint(small, tmp_path_factory.mktemp("saved") / "ckpt", rmtkd_log=LOG,
                                     tokenizer=tokenizer, card_kwargs={"metric_after": 0.8, "model_id": "me/tiny"})


def expected_files(report) -> set[str]:
    plots = {f"spectra/{name}.png" for name in report.names} | {"spectra/summary.png"}
    return {"config.json", "model.safetensors", "README.md", "rmtkd_report.json", *CODE_FILES, *plots}


def tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_checkpoint_holds_every_file_and_reloads(saved, small):
    extra = {"rmtkd_log.json", "tokenizer.json", "tokenizer_config.json"}
    assert set(tree(saved)) == expected_files(small.rmtkd_report) | extra
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]  # no temporary folders left
    assert SpectralReport.from_json(saved / "rmtkd_report.json").names == small.rmtkd_report.names
    reloaded = AutoModelForSequenceClassification.from_pretrained(saved)
    assert type(reloaded).__name__ == "RMTKDForSequenceClassification"
    inputs = tiny_inputs("bert", seed=7)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, small(**inputs).logits)
    card = (saved / "README.md").read_text(encoding="utf-8")
    assert 'from_pretrained("me/tiny")' in card and card.endswith("```\n")
    assert not any(SECRET.encode() in p.read_bytes() for p in saved.rglob("*") if p.is_file())


def test_resave_replaces_the_folder(saved, tmp_path):
    reloaded = AutoModelForSequenceClassification.from_pretrained(saved)  # no report: no plots, a fast save
    target = tmp_path / "ckpt"
    save_rmtkd_checkpoint(reloaded, target, card_kwargs={"metric_after": 0.5})
    (target / "stale.txt").write_text("from the first save")
    save_rmtkd_checkpoint(reloaded, target, card_kwargs={"metric_after": 0.75})
    assert not (target / "stale.txt").exists()
    assert "| accuracy | not measured | 0.75 |" in (target / "README.md").read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("where", ["save_pretrained", "plot"])
def test_failed_save_keeps_the_previous_checkpoint(saved, small, tmp_path, monkeypatch, where):
    target = tmp_path / "ckpt"
    reloaded = AutoModelForSequenceClassification.from_pretrained(saved)
    save_rmtkd_checkpoint(reloaded, target)
    before = tree(target)

    def fail(self, directory, *args, **kwargs):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "partial.bin").write_bytes(b"half written")
        raise RuntimeError("disk full")

    if where == "save_pretrained":
        monkeypatch.setattr(type(reloaded), "save_pretrained", fail)
        model = reloaded
    else:  # after the weights, the code and the report are written
        monkeypatch.setattr(SpectralReport, "plot", fail)
        model = small
    with pytest.raises(RuntimeError, match="disk full"):
        save_rmtkd_checkpoint(model, target)
    assert tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(saved, tmp_path):
    reloaded = AutoModelForSequenceClassification.from_pretrained(saved)
    (tmp_path / "checkpoint-500").mkdir()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="checkpoint-500"):
        save_rmtkd_checkpoint(reloaded, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-500", "config.json"]
    assert sorted(p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}")) == []


class FakeApi:
    """Records what `HfApi` would send: the repo creation and a copy of every uploaded file."""

    def __init__(self):
        self.calls, self.files = [], {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        self.files = {p.relative_to(folder_path).as_posix(): p.read_bytes()
                      for p in Path(folder_path).rglob("*") if p.is_file()}
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", commit_message="m",
                          commit_description="", oid="abc")


def test_push_model_uploads_card_plots_report_and_no_token(small, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    api = FakeApi()
    # Two sites are enough here (the full set of plots is checked on `saved`), and keep the plotting short.
    report = SpectralReport(sites=small.rmtkd_report.sites[:2], settings=small.rmtkd_report.settings)
    url = push_model(small, "me/tiny-rmtkd", api=api, report=report, rmtkd_log=LOG, private=True, revision="v1",
                     tags=["demo"], card_kwargs={"metric_before": 0.81, "metric_after": 0.8,
                                                 "datasets": ["rotten_tomatoes"]})
    assert url == "https://huggingface.co/me/tiny-rmtkd/commit/abc"
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][2]["private"] is True and api.calls[0][2]["exist_ok"] is True
    assert api.calls[2][2]["revision"] == "v1"
    # The token is left to huggingface_hub's own resolution (HF_TOKEN here), never passed around or written.
    assert all(call[2].get("token") is None for call in api.calls)
    assert set(api.files) == expected_files(report) | {"rmtkd_log.json"}
    for name, content in api.files.items():
        assert SECRET.encode() not in content, name
    card = api.files["README.md"].decode()
    assert 'from_pretrained("me/tiny-rmtkd")' in card and "- demo" in card and "model-index" in card


def test_push_checkpoint_through_hf_api(saved, monkeypatch):
    """The real `HfApi.upload_folder` (its network calls replaced) picks up every file of the folder."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    captured, validated = {}, []

    def create_commit(self, repo_id, operations, **kwargs):
        captured.update({op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations})
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/def", commit_message="m",
                          commit_description="", oid="def")

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    # upload_folder posts README.md to the Hub's YAML validator before hashing anything, and with hf_xet installed
    # streams through its own pipeline: take the single-commit path, which ends in the `create_commit` above.
    monkeypatch.setattr(hf_api, "is_xet_available", lambda: False)
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **kw: validated.append(content))
    url = push_rmtkd_checkpoint(saved, "me/tiny-rmtkd", commit_message="Add RMT-KD model")
    assert url.endswith("/commit/def")
    assert set(captured) == set(tree(saved))
    assert validated == [(saved / "README.md").read_text(encoding="utf-8")]
    assert not any(SECRET.encode() in content for content in captured.values())


def test_push_refuses_a_folder_holding_the_token(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "README.md"):
        (folder / name).write_bytes((saved / name).read_bytes())
    # Straddle a chunk boundary of the streamed scan.
    monkeypatch.setattr(hub, "SCAN_CHUNK", 4096)
    (folder / "training_args.bin").write_bytes(b"\x80\x04" + b"x" * 4090 + SECRET.encode() + b"\x00" * 100)
    api = FakeApi()
    with pytest.raises(ValueError, match="training_args.bin"):
        push_rmtkd_checkpoint(folder, "me/tiny-rmtkd", api=api)
    assert api.calls == []


def test_push_needs_a_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json, README.md"):
        push_rmtkd_checkpoint(tmp_path, "me/tiny-rmtkd", api=FakeApi())

