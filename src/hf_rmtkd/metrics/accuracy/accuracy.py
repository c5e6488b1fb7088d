"""Accuracy, the share of predictions equal to their references, as a local `evaluate` metric module.

`evaluate.load("accuracy")` fetches its script from the Hugging Face Hub, so it fails offline. This module holds the
same metric; load it by path: ``evaluate.load(".../hf_rmtkd/metrics/accuracy")`` or `hf_rmtkd.metrics.load_metric`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the proportion of predictions that equal their references, (TP + TN) / (all examples)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): return the proportion (True, default) or the count of correct predictions.
    sample_weight (list of float): optional weight of each example.
Returns:
    accuracy (float): in [0, 1] when normalize is True.
Examples:
    >>> metric = evaluate.load("hf_rmtkd/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Accuracy of integer class predictions."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = (np.asarray(predictions) == np.asarray(references)).astype(np.float64)
        if sample_weight is not None:
            correct = correct * np.asarray(sample_weight, dtype=np.float64)
            total = float(np.sum(sample_weight))
        else:
            total = float(correct.size)
        value = float(correct.sum())
        return {"accuracy": value / total if normalize else value}
