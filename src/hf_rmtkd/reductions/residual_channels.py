"""``residual`` for ResNets: keep whole channels of every residual stream.

A transformers ResNet carries a residual stream through each run of blocks joined by identity shortcuts; a block with
a projection shortcut (the first of a stage that changes width or stride) starts a new one, and the stem's output is
the first. Between the convolutions that write a stream and those that read it every operation acts on each channel
alone: BatchNorm, ReLU, the stem's max pooling, the residual add and the final average pooling. So a stream can keep
a subset J of its channels exactly:

- the writers (each block's last convolution and its BatchNorm, a projection shortcut and its BatchNorm, the stem's
  convolution and BatchNorm) keep the output rows J, and everything up to the readers computes the same numbers on J
  as before;
- each reader (a block's first convolution, a projection shortcut, the classifier) sees only h_J where it read h, and
  is refit by least squares to rebuild the dropped channels from the kept ones at its own input, as ``ffn_width``
  does for an inner width: h ≈ A h_J + (μ − A μ_J) with A = Σ[:, J] Σ[J, J]⁻¹ (on the second moment Σ + μμᵀ for the
  bias-free convolutions, so zero padding stays consistent).

A projection of the stream onto its eigen-directions, as the post-LayerNorm ``residual`` cut uses, would not survive
the ReLU after every residual add; whole channels do. How many: k = the outlier count of the stream's spectrum (the
mean covariance at the block inputs that read it, every pixel a sample), with the spectrum settings of every other
site and at least ``min_rank``. Which: the k channels that best span the top-k eigen-directions (`select_neurons`).

The last stream becomes the pooled features: it is cut only when a Linear classifier reads them
(``ResNetForImageClassification``); a bare ``ResNetModel``'s output keeps its width.

Example:
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1]))
    >>> [s.writers[0] for s in channel_streams(model)]
    ['resnet.embedder.embedder.convolution', 'resnet.encoder.stages.0.layers.0.shortcut.convolution', \
'resnet.encoder.stages.1.layers.0.shortcut.convolution']
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..architectures import Site, unique_module_path
from ..calibration import collect_statistics
from ..modeling.layers_rmtkd import get_submodule, plan_residual_channels, set_submodule
from ..spectrum import count_outliers
from .ffn_width import _set_consumer, _slice_producer, reconstruction_map, select_neurons

__all__ = ["CHANNEL_STREAM_MODEL_TYPES", "ChannelStream", "channel_stream_entry", "channel_streams",
           "cut_residual_channels", "keep_stream_channels"]

CHANNEL_STREAM_MODEL_TYPES = ("resnet",)


@dataclass(frozen=True)
class ChannelStream:
    """One residual stream of a ResNet: the modules writing its channels and, per place it is read, the readers.

    Attributes:
        writers: convolutions and BatchNorms whose output channels are the stream's.
        reads: ``(read point, readers)`` pairs: a module whose input is the stream (a block, or the classifier), and
            the layers inside it that read that input.
    """

    writers: tuple[str, ...]
    reads: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def readers(self) -> tuple[str, ...]:
        return tuple(reader for _, readers in self.reads for reader in readers)


def channel_streams(model: nn.Module) -> list[ChannelStream]:
    """The residual streams of a transformers ResNet, in depth order (see the module docstring).

    Raises:
        ValueError: the model is not a transformers ResNet, or is a backbone (its stage outputs keep their widths).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    stem = unique_module_path(model, "embedder.embedder")
    if model_type not in CHANNEL_STREAM_MODEL_TYPES or stem is None:
        raise ValueError(f"channel_streams reads transformers ResNets (model types {list(CHANNEL_STREAM_MODEL_TYPES)})"
                         f"; {type(model).__name__} has model_type {model_type!r}.")
    if hasattr(model, "out_features"):  # a backbone: its stages' feature maps are its outputs, widths and all
        raise ValueError(f"{type(model).__name__} returns the feature maps of stages {model.out_features}, whose "
                         "channels the heads reading them expect; the residual kind cuts a classifier or a plain "
                         "ResNetModel. Leave 'residual' out of reduction_kinds for a backbone.")
    names = dict(model.named_modules())
    prefix = stem[: -len("embedder.embedder")]
    streams = []
    writers, reads = [f"{stem}.convolution", f"{stem}.normalization"], []
    stage = 0
    while f"{prefix}encoder.stages.{stage}" in names:
        block = 0
        while (path := f"{prefix}encoder.stages.{stage}.layers.{block}") in names:
            projects = not isinstance(names[f"{path}.shortcut"], nn.Identity)
            first = f"{path}.layer.0.convolution"
            reads.append((path, (f"{path}.shortcut.convolution", first) if projects else (first,)))
            if projects:  # the block writes a new stream through its shortcut
                streams.append(ChannelStream(tuple(writers), tuple(reads)))
                writers, reads = [f"{path}.shortcut.convolution", f"{path}.shortcut.normalization"], []
            last = f"{path}.layer.{len(names[f'{path}.layer']) - 1}"
            writers += [f"{last}.convolution", f"{last}.normalization"]
            block += 1
        stage += 1
    classifier = names.get("classifier.1") if prefix == "resnet." else None
    if isinstance(classifier, nn.Linear):  # the pooled features have a reader to refit; else they are the output
        reads.append(("classifier.1", ("classifier.1",)))
        streams.append(ChannelStream(tuple(writers), tuple(reads)))
    return streams


def stream_read_sites(streams: list[ChannelStream]) -> list[Site]:
    """Calibration sites: the input of every read point (channels of a block's input; the classifier's features)."""
    return [Site(point, point, "input", "residual", j, channel_dim=-1 if point == "classifier.1" else 1)
            for j, stream in enumerate(streams) for point, _ in stream.reads]


def stream_spectrum(statistics: dict, stream: ChannelStream, effective_samples: str,
                    n_images: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(eigenvalues, eigenvectors, n)`` of the stream's mean covariance over the block inputs reading it
    (descending, float64), and the samples n behind it; the classifier's features when no block reads the stream."""
    points = [p for p, _ in stream.reads if p != "classifier.1"] or [p for p, _ in stream.reads]
    accumulators = [statistics[p] for p in points]
    covariance = sum(a.covariance() for a in accumulators) / len(accumulators)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    n = min(a.count for a in accumulators) if effective_samples == "tokens" else n_images
    return eigenvalues.flip(0), eigenvectors.flip(1), n


def channel_stream_entry(stream: ChannelStream, width: int) -> dict:
    """The reduction-map entry (shapes only) of ``stream`` kept to ``width`` channels; keyed by its first writer."""
    return {"kind": "residual_channels", "width": width, "writers": list(stream.writers),
            "readers": list(stream.readers)}


@torch.no_grad()
def keep_stream_channels(model: nn.Module, stream: ChannelStream, keep: torch.Tensor, statistics: dict,
                         ridge: float = 1e-6) -> dict:
    """Keep the channels ``keep`` of ``stream`` (in place): writers sliced, every reader refit on its own input.

    Args:
        model: the ResNet, its stream layers still plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear``.
        stream: from `channel_streams`.
        keep: J, the kept channel indices, sorted ascending.
        statistics: ``{read point: CovarianceAccumulator}`` (`stream_read_sites`).
        ridge: relative ridge of the refit.

    Returns:
        The reduction-map entry, keyed by the stream's first writer in the map.
    """
    entry = channel_stream_entry(stream, int(keep.numel()))
    new = plan_residual_channels(model, stream.writers[0], entry)
    for writer in stream.writers:
        _slice_producer(get_submodule(model, writer), new[writer], keep)
    for point, readers in stream.reads:
        sigma, mu = statistics[point].covariance(), statistics[point].mean()
        for reader in readers:
            old = get_submodule(model, reader)
            # A reader with a bias absorbs the mean term, so fit on Σ; without one, on Σ + μμᵀ (no intercept).
            second_moment = sigma if old.bias is not None else sigma + torch.outer(mu, mu)
            mix = reconstruction_map(second_moment, keep, ridge)
            _set_consumer(old, new[reader], mix, mu - mix @ mu[keep])
    for path, module in new.items():
        set_submodule(model, path, module)
    return entry


def cut_residual_channels(model: nn.Module, data, *, estimator: str = "mp_fit", quantile: float = 0.5,
                          edge: str = "tracy_widom", effective_samples: str = "tokens", min_rank: int = 8,
                          max_tokens: int | None = None, batch_size: int = 32, collate_fn=None, accelerator=None,
                          progress: bool = True) -> tuple[dict[str, dict], dict[str, dict]]:
    """Measure every residual stream of a ResNet on ``data`` and keep its outlier count of channels (in place).

    Args:
        model: a transformers ResNet with no other cut yet (see `channel_streams`).
        data: calibration batches, as for `collect_statistics`.
        estimator, quantile, edge, effective_samples: the spectrum settings (as for every other site).
        min_rank: the fewest channels a stream keeps.
        max_tokens, batch_size, collate_fn, accelerator, progress: as for `collect_statistics`.

    Returns:
        ``(entries, sites)``: the reduction-map entries, and per stream that shrinks (keyed by its first writer)
        ``{"kind": "residual", "d", "k", "k_spectrum"}`` for the round log.

    Example:
        >>> entries, sites = cut_residual_channels(resnet, calibration_images)  # doctest: +SKIP
    """
    streams = channel_streams(model)
    for path in (p for s in streams for p in (*s.writers, *s.readers)):
        if type(get_submodule(model, path)) not in (nn.Conv2d, nn.BatchNorm2d, nn.Linear):
            raise ValueError(f"residual: '{path}' is a {type(get_submodule(model, path)).__name__}; narrow the "
                             "residual streams before any other cut touches their layers.")
    statistics = collect_statistics(model, data, stream_read_sites(streams), max_tokens=max_tokens,
                                    batch_size=batch_size, collate_fn=collate_fn, accelerator=accelerator,
                                    progress=progress)
    entries, sites = {}, {}
    for stream in streams:
        eigenvalues, eigenvectors, n = stream_spectrum(statistics.accumulators, stream, effective_samples,
                                                       statistics.n_sequences)
        d = eigenvalues.numel()
        counted = count_outliers(eigenvalues, n, estimator=estimator, quantile=quantile, edge=edge).k
        k = min(d, max(counted, min_rank))
        if k == d:
            continue
        keep = select_neurons(eigenvectors, eigenvalues, k)
        entries[stream.writers[0]] = keep_stream_channels(model, stream, keep, statistics.accumulators)
        sites[stream.writers[0]] = {"kind": "residual", "d": d, "k": k, "k_spectrum": counted}
    return entries, sites
