"""Save an RMT-KD model as a complete checkpoint folder: weights, code, tokenizer, report, plots, log and model card.

Everything is written into a temporary sibling folder first and renamed into place when complete, so a reader (or a
``push``) never sees a half-written checkpoint and a failure leaves any previous checkpoint as it was.

Example:
    >>> small = hf_rmtkd.compress(model, calibration_set)  # doctest: +SKIP
    >>> save_rmtkd_checkpoint(small, "out/", tokenizer=tokenizer,
    ...                       card_kwargs={"metric_after": 0.905, "datasets": ["rotten_tomatoes"]})  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from .card import CARD_NAME, LOG_NAME, REPORT_NAME, build_model_card

__all__ = ["PLOTS_DIR", "save_rmtkd_checkpoint"]

PLOTS_DIR = "spectra"
# Sub-folders a checkpoint written here may hold; an existing folder with any other is not ours to replace.
OWN_SUBFOLDERS = {PLOTS_DIR}


def save_rmtkd_checkpoint(
    model,
    save_directory: str | os.PathLike,
    *,
    report=None,
    rmtkd_log: list[dict] | None = None,
    card_kwargs: dict | None = None,
    tokenizer=None,
) -> Path:
    """Write a complete RMT-KD checkpoint folder, atomically.

    The folder holds ``config.json``, ``model.safetensors`` and the modelling code (``model.save_pretrained``), the
    tokenizer or processor when given, ``rmtkd_report.json`` and ``spectra/*.png`` when a report is available,
    ``rmtkd_log.json`` when a log is given, and ``README.md`` (the model card, see `hf_rmtkd.card.build_model_card`).
    No access token is read or written.

    Args:
        model: an RMT-KD model (``hf_rmtkd.compress`` output or ``RMTKDTrainer.model``).
        save_directory: the checkpoint folder. An existing one is replaced as a whole, but only once the new one is
            complete; it must be empty or a checkpoint (``config.json``, no sub-folders but ``spectra/``), so that
            an output folder holding other runs is never wiped.
        report: the `SpectralReport`; default ``model.rmtkd_report`` (absent on a model loaded from disk).
        rmtkd_log: the per-round log (``RMTKDTrainer.rmtkd_log``).
        card_kwargs: keyword arguments of `build_model_card` (``metric_before``, ``metric_after``, ``datasets``,
            ``base_model``, ``model_id``, ``speed_ratio``, ``settings``, ...).
        tokenizer: a tokenizer, image processor or processor to save beside the model.

    Returns:
        The checkpoint folder, as an absolute path.

    Raises:
        FileExistsError: ``save_directory`` exists and is not a checkpoint folder this function may replace.

    Example:
        >>> path = save_rmtkd_checkpoint(small, "out/")  # doctest: +SKIP
        >>> AutoModelForSequenceClassification.from_pretrained(path)  # after `import hf_rmtkd`  # doctest: +SKIP
    """
    # Absolute (symlinks kept), so that "." or "out/" still has a parent to hold the temporary sibling.
    target = Path(os.path.abspath(save_directory))
    _check_replaceable(target)
    report = report if report is not None else getattr(model, "rmtkd_report", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so the final rename stays on one file system; os.mkdir (not mkdtemp, which makes it 0700) so the
    # checkpoint gets the usual permissions.
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.to_json(tmp / REPORT_NAME)
            report.plot(tmp / PLOTS_DIR)
        if rmtkd_log is not None:
            (tmp / LOG_NAME).write_text(json.dumps(rmtkd_log, indent=2) + "\n", encoding="utf-8")
        card = build_model_card(model, report=report, rmtkd_log=rmtkd_log, save_directory=tmp,
                                image_dir=PLOTS_DIR, **(card_kwargs or {}))
        card.save(tmp / CARD_NAME)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_replaceable(target: Path) -> None:
    """Refuse to replace anything but an empty folder or a checkpoint folder (the whole folder is replaced)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"'{target}' exists and is not a folder; choose another save_directory.")
    entries = list(target.iterdir())
    if not entries:
        return
    foreign = sorted(p.name for p in entries if p.is_dir() and p.name not in OWN_SUBFOLDERS)
    if not (target / "config.json").is_file() or foreign:
        what = f"sub-folders {foreign}" if foreign else "files but no config.json"
        raise FileExistsError(
            f"'{target}' holds {what}, so it is not a checkpoint folder; the save replaces the whole folder, so "
            "choose a new or checkpoint-only save_directory (e.g. a sub-folder of your output folder)."
        )


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the complete ``tmp`` to ``target``, replacing an existing ``target`` only now.

    A folder cannot be renamed over a non-empty one, so the old one is first renamed aside, then deleted. Should the
    process die between the two renames, the old checkpoint survives as ``.<name>.old-<id>`` beside the new one.
    """
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the previous checkpoint back
        raise
    shutil.rmtree(old, ignore_errors=True)
