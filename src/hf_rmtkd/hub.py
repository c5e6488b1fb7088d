"""Push RMT-KD checkpoints to the Hugging Face Hub: weights, code, model card, spectrum plots, report and log.

The access token is resolved the way huggingface_hub always does (the ``token`` argument, else ``HF_TOKEN``, else the
stored login) and only ever travels in request headers: it is never written to a file, card, log or report, and a
folder holding it is refused before anything is uploaded.

Example:
    >>> save_rmtkd_checkpoint(small, "out/", card_kwargs={"model_id": "me/bert-rmtkd"})  # doctest: +SKIP
    >>> push_rmtkd_checkpoint("out/", "me/bert-rmtkd")  # doctest: +SKIP
    >>> push_model(small, "me/bert-rmtkd")  # both steps, through a temporary folder  # doctest: +SKIP
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, get_token

from .card import CARD_NAME
from .checkpoint import save_rmtkd_checkpoint

__all__ = ["DEFAULT_COMMIT_MESSAGE", "install_push_to_hub", "push_model", "push_rmtkd_checkpoint"]

DEFAULT_COMMIT_MESSAGE = "Upload RMT-KD compressed model"
REQUIRED_FILES = ("config.json", CARD_NAME)
SCAN_CHUNK = 1 << 20


def push_rmtkd_checkpoint(
    save_directory: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    api: HfApi | None = None,
) -> str:
    """Upload a checkpoint folder written by `save_rmtkd_checkpoint` to a Hub model repo (created if missing).

    Args:
        save_directory: the checkpoint folder (must hold ``config.json`` and ``README.md``).
        repo_id: ``"owner/name"`` of the model repo.
        token: a Hub token; default huggingface_hub's resolution (``HF_TOKEN``, then the stored login).
        private: visibility of a newly created repo (an existing repo keeps its own).
        commit_message, commit_description: the commit's message and description.
        revision: the branch to push to (created from the default branch if missing).
        create_pr: open a pull request instead of committing to the branch.
        api: the `huggingface_hub.HfApi` to use (tests pass a fake); default ``HfApi()``.

    Returns:
        The URL of the commit (or of the pull request).

    Raises:
        FileNotFoundError: the folder is not a checkpoint folder.
        ValueError: a file in the folder contains the access token (nothing is uploaded).

    Example:
        >>> push_rmtkd_checkpoint("out/", "me/bert-rmtkd", private=True)  # doctest: +SKIP
        'https://huggingface.co/me/bert-rmtkd/commit/...'
    """
    folder = Path(save_directory)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"'{folder}' is not an RMT-KD checkpoint folder (missing {', '.join(missing)}); write it with "
            "hf_rmtkd.checkpoint.save_rmtkd_checkpoint first."
        )
    _refuse_token_leak(folder, [token, get_token()])
    api = api if api is not None else HfApi()
    repo_url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id  # the Hub may complete a bare name with the user
    if revision is not None:
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message=commit_message, commit_description=commit_description,
        token=token, repo_type="model", revision=revision, create_pr=create_pr,
    )
    return str(getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or commit)


def push_model(
    model,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    report=None,
    rmtkd_log: list[dict] | None = None,
    card_kwargs: dict | None = None,
    tokenizer=None,
    api: HfApi | None = None,
) -> str:
    """Save ``model`` as a full RMT-KD checkpoint in a temporary folder and push it (the hook behind ``push_to_hub``).

    Unlike ``PreTrainedModel.push_to_hub``, which uploads only what ``save_pretrained`` writes, this uploads the model
    card, the spectrum plots, the spectral report and the per-round log too.

    Args:
        model: an RMT-KD model.
        repo_id: ``"owner/name"`` of the model repo.
        token, private, commit_message, commit_description, revision, create_pr, api: as for
            `push_rmtkd_checkpoint`.
        tags: extra Hub tags for the card.
        report, rmtkd_log, tokenizer: as for `save_rmtkd_checkpoint`.
        card_kwargs: keyword arguments of `build_model_card`; ``model_id`` defaults to ``repo_id`` so the card's
            snippets load from the Hub.

    Returns:
        The URL of the commit (or of the pull request).

    Example:
        >>> small = hf_rmtkd.compress(model, calibration_set)  # doctest: +SKIP
        >>> push_model(small, "me/bert-rmtkd", card_kwargs={"metric_after": 0.905})  # doctest: +SKIP
    """
    card_kwargs = {"model_id": repo_id, **(card_kwargs or {})}
    if tags:
        card_kwargs["tags"] = [*card_kwargs.get("tags", []), *tags]
    with tempfile.TemporaryDirectory(prefix="hf_rmtkd-push-") as tmp:
        folder = save_rmtkd_checkpoint(model, Path(tmp) / "checkpoint", report=report, rmtkd_log=rmtkd_log,
                                       card_kwargs=card_kwargs, tokenizer=tokenizer)
        return push_rmtkd_checkpoint(
            folder, repo_id, token=token, private=private, commit_message=commit_message,
            commit_description=commit_description, revision=revision, create_pr=create_pr, api=api,
        )


def _refuse_token_leak(folder: Path, tokens: list[str | None]) -> None:
    """Raise if any file in ``folder`` contains one of ``tokens``.

    A safety net for folders not written by `save_rmtkd_checkpoint`, e.g. a Trainer output with a pickled
    ``training_args.bin`` from a run that set ``hub_token``. Files are streamed in chunks; a ``.safetensors`` file
    is checked in its JSON header only (tensor bytes hold no strings).
    """
    needles = [t.encode() for t in tokens if t]
    if not needles:
        return
    overlap = max(len(n) for n in needles) - 1  # so a token split across two chunks is still found
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            if path.suffix == ".safetensors":
                (length,) = struct.unpack("<Q", f.read(8))
                chunks = iter([f.read(length)])
            else:
                chunks = iter(lambda: f.read(SCAN_CHUNK), b"")
            tail = b""
            for chunk in chunks:
                window = tail + chunk
                if any(needle in window for needle in needles):
                    raise ValueError(
                        f"'{path}' contains a Hugging Face access token; nothing was uploaded. Remove the file (or "
                        "the token from it, e.g. TrainingArguments.hub_token before saving) and push again."
                    )
                tail = window[-overlap:] if overlap else b""


def _push_to_hub(self, repo_id: str, **kwargs) -> str:
    """Push weights, config and code together with the model card, spectrum plots and report (see `push_model`)."""
    kwargs.pop("max_shard_size", None)  # one safetensors file, as save_pretrained writes it
    return push_model(self, repo_id, **kwargs)


def install_push_to_hub() -> None:
    """Make ``model.push_to_hub(repo_id)`` on RMTKD models upload the card, plots and report too.

    Installed on the plugin's own classes at import time rather than written in ``modeling_rmtkd.py``: that file is
    copied into every checkpoint and may import only torch and transformers, so a checkpoint loaded as remote code
    keeps transformers' plain ``push_to_hub``.
    """
    from .modeling import RMTKDPreTrainedModel

    RMTKDPreTrainedModel.push_to_hub = _push_to_hub
