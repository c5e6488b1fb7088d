"""Metrics that work offline: evaluate modules kept inside this package, loaded by path.

`evaluate.load("accuracy")` needs the Hugging Face Hub; ``load_metric("accuracy")`` loads the same metric from
``hf_rmtkd/metrics/accuracy/accuracy.py``, so users keep the `evaluate` API without the network.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["available_metrics", "compute_accuracy", "load_metric"]

_METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    """The names of the metric modules shipped here."""
    return sorted(p.parent.name for p in _METRICS_DIR.glob("*/*.py") if p.stem == p.parent.name)


def load_metric(name: str = "accuracy"):
    """Load a metric module shipped with hf_rmtkd through `evaluate.load`, offline.

    Args:
        name: the metric (see `available_metrics`).

    Returns:
        An `evaluate.EvaluationModule`.

    Example:
        >>> load_metric("accuracy").compute(predictions=[1, 0], references=[1, 1])
        {'accuracy': 0.5}
    """
    import evaluate

    path = _METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"No local metric '{name}'; hf_rmtkd ships {available_metrics()}.")
    return evaluate.load(str(path))


@lru_cache(maxsize=1)
def _accuracy():
    # Loading copies the module into the HF modules cache; do it once per process, not at every evaluation.
    return load_metric("accuracy")


def compute_accuracy(eval_pred) -> dict[str, float]:
    """`Trainer` ``compute_metrics`` for classification: accuracy of the arg-max of the logits.

    Args:
        eval_pred: a `transformers.EvalPrediction` (or a ``(predictions, label_ids)`` pair). ``predictions`` are
            logits of shape (N, C) (a tuple of outputs is allowed: the first is taken) or class ids of shape (N,).

    Returns:
        ``{"accuracy": float}``.

    Example:
        >>> Trainer(..., compute_metrics=compute_accuracy)  # doctest: +SKIP
    """
    predictions, labels = eval_pred[0], eval_pred[1]
    if isinstance(predictions, tuple | list):
        predictions = predictions[0]
    predictions = np.asarray(predictions)
    if predictions.ndim > 1:
        predictions = predictions.argmax(axis=-1)
    return _accuracy().compute(predictions=predictions.reshape(-1), references=np.asarray(labels).reshape(-1))
