"""Small shared helpers: module paths, parameter counts, atomic file writes."""

import os
import uuid
from pathlib import Path

from torch import nn

from .modeling.layers_rmtkd import ModulePathError, get_submodule, set_submodule

__all__ = [
    "ModulePathError", "count_parameters", "get_submodule", "set_submodule", "tokenizer_with", "write_text_atomic",
]


def count_parameters(*modules: nn.Module) -> int:
    """Number of distinct parameter elements in ``modules`` (a tensor shared between them counts once).

    Args:
        modules: any number of modules.

    Returns:
        The total ``numel`` of their unique parameters.
    """
    unique = {id(p): p for module in modules for p in module.parameters()}
    return sum(p.numel() for p in unique.values())


def tokenizer_with(attribute: str, *owners):
    """The first tokenizer among ``owners`` whose ``attribute`` is set (None if none has it).

    An owner is a tokenizer, or what holds one as ``.tokenizer``: a processor, a data collator (what a `Trainer` has
    as ``processing_class`` and ``data_collator``).
    """
    for owner in owners:
        tokenizer = getattr(owner, "tokenizer", owner)
        if getattr(tokenizer, attribute, None) is not None:
            return tokenizer
    return None


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temporary file in the same folder, then renamed over ``path``.

    Readers never see a half-written file, and a process killed mid-write leaves the previous version. (An exclusive
    ``open`` rather than ``mkstemp``, whose 0600 mode would make the file private.)

    Args:
        path: the file to write; its folder is created if needed.
        text: the content (UTF-8).

    Returns:
        ``path`` as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
