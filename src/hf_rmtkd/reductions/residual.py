"""``residual``: narrow the residual stream of a post-LayerNorm encoder to its signal directions.

Post-LayerNorm encoders: BERT, RoBERTa, XLM-R, CamemBERT and DistilBERT (`POST_NORM_LAYOUTS`); ResNets keep whole
channels of their streams instead (``residual_channels``, which `cut_residual_stream` hands them to). Every Linear of a
transformer reads or writes the residual stream, so its width d sits on one side of every weight
matrix, and every LayerNorm, GELU input and residual add runs at that width. On MiniLM-L6 fine-tuned on Rotten
Tomatoes, the calibration spectra of the stream keep 120–146 of 384 directions above the Marchenko–Pastur edge.

The stream is cut in segments. Segment j runs from post-LayerNorm j (output y) to post-LayerNorm j + 1 (input
s = y + w, w the sublayer's output). Let μ and μ_s be the means of y and s, Σ_y and Σ_s their covariances, and
C = I − 11ᵀ/d the centring LayerNorm applies. The segment keeps the k top eigenvectors U of C (Σ_y + Σ_s) C / 2,
k counted by the spectrum's outlier rule like every other site, plus the all-ones direction (the per-token mean,
which readers use and the norm discards): the basis B = [U, 1/√d], orthonormal, d × (k + 1). Then:

- the stream is held as coordinates z = Bᵀ(y − μ);
- a reader W (q, k, v; the FFN's up-projection) becomes W B with bias b + W μ;
- a writer W_o (the attention output projection; the FFN's down-projection) becomes Bᵀ W_o with bias Bᵀ b_o, so
  the residual add stays a plain add of coordinates;
- norm j + 1 sees s ≈ B z_s + o with o = μ + (I − BBᵀ)(μ_s − μ), so its centred input is U (z_s[:k] + Uᵀ C o) + o⊥,
  whose squared length needs k numbers (`ReducedLayerNorm`), and its output γ ⊙ (·)/σ + β is moved into the next
  segment's basis by one (k' + 1) × k matrix, which folds γ in.

The embeddings' norm reads the full-width sum of the embeddings; the last norm writes full width for the heads (the
pooler, an LM head), so nothing outside the encoder changes. With k = d − 1 the basis is complete and the model is
unchanged up to rounding. What is lost at smaller k is the stream's variance outside the kept directions, which the
distillation that follows recovers.

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                                                  num_attention_heads=2, intermediate_size=32))
    >>> [s.norm for s in stream_segments(model)]
    ['bert.embeddings.LayerNorm', 'bert.encoder.layer.0.attention.output.LayerNorm']
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..architectures import Site, unique_module_path
from ..calibration import collect_statistics
from ..modeling.layers_rmtkd import get_submodule, plan_residual, set_submodule
from ..spectrum import count_outliers
from .residual_channels import CHANNEL_STREAM_MODEL_TYPES, cut_residual_channels

__all__ = ["POST_NORM_LAYOUTS", "POST_NORM_MODEL_TYPES", "PostNormLayout", "StreamSegment", "cut_residual_stream",
           "hidden_state_coordinates", "narrow_residual_stream", "stream_bases", "stream_entries", "stream_norms",
           "stream_segments", "stream_sites", "stream_widths"]


@dataclass(frozen=True)
class PostNormLayout:
    """Where a post-LayerNorm encoder keeps its norms and the Linears around them (paths relative to the model's
    embeddings' parent, ``{i}`` the layer index)."""

    layers: str  # the repeated blocks, e.g. "encoder.layer"
    attention_norm: str
    output_norm: str
    qkv: tuple[str, str, str]
    attention_writer: str
    ffn_reader: str
    ffn_writer: str


_BERT_LAYOUT = PostNormLayout("encoder.layer", "attention.output.LayerNorm", "output.LayerNorm",
                              ("attention.self.query", "attention.self.key", "attention.self.value"),
                              "attention.output.dense", "intermediate.dense", "output.dense")
POST_NORM_LAYOUTS = {
    "bert": _BERT_LAYOUT,
    "roberta": _BERT_LAYOUT,
    "xlm-roberta": _BERT_LAYOUT,
    "camembert": _BERT_LAYOUT,
    "distilbert": PostNormLayout("transformer.layer", "sa_layer_norm", "output_layer_norm",
                                 ("attention.q_lin", "attention.k_lin", "attention.v_lin"), "attention.out_lin",
                                 "ffn.lin1", "ffn.lin2"),
}
POST_NORM_MODEL_TYPES = tuple(POST_NORM_LAYOUTS)


@dataclass(frozen=True)
class StreamSegment:
    """The residual stream between two post-LayerNorms: who writes it, who reads it."""

    norm: str  # the LayerNorm whose output starts the segment
    closing_norm: str  # the LayerNorm whose input ends it
    readers: tuple[str, ...]  # Linears reading the norm's output
    writers: tuple[str, ...]  # Linears adding into the stream before the closing norm


def stream_segments(model: nn.Module) -> list[StreamSegment]:
    """The residual-stream segments of a post-LayerNorm encoder (`POST_NORM_LAYOUTS`), in depth order.

    Raises:
        ValueError: the model is not one of those encoders.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    embedding_norm = unique_module_path(model, "embeddings.LayerNorm")
    if model_type not in POST_NORM_LAYOUTS or embedding_norm is None:
        raise ValueError(
            f"The residual kind narrows post-LayerNorm encoders (model types {list(POST_NORM_MODEL_TYPES)}) and "
            f"ResNets ({list(CHANNEL_STREAM_MODEL_TYPES)}); "
            f"{type(model).__name__} has model_type {model_type!r}. Leave 'residual' out of reduction_kinds for this "
            "model."
        )
    layout = POST_NORM_LAYOUTS[model_type]
    names = dict(model.named_modules())
    prefix = embedding_norm[: -len("embeddings.LayerNorm")]
    layer = lambda i, name: f"{prefix}{layout.layers}.{i}.{name}"  # noqa: E731
    depth = 0
    while f"{prefix}{layout.layers}.{depth}" in names:
        depth += 1
    segments = []
    norm = embedding_norm
    for i in range(depth):
        attention_norm, output_norm = layer(i, layout.attention_norm), layer(i, layout.output_norm)
        segments.append(StreamSegment(norm, attention_norm, tuple(layer(i, p) for p in layout.qkv),
                                      (layer(i, layout.attention_writer),)))
        segments.append(StreamSegment(attention_norm, output_norm, (layer(i, layout.ffn_reader),),
                                      (layer(i, layout.ffn_writer),)))
        norm = output_norm
    return segments


def stream_norms(segments: list[StreamSegment]) -> list[str]:
    """Every LayerNorm of the stream in depth order: each segment's opening norm, then the last closing one."""
    return [segments[0].norm] + [s.closing_norm for s in segments]


def stream_sites(segments: list[StreamSegment]) -> list[Site]:
    """Calibration sites for every norm's input and output (`collect_statistics` measures them)."""
    norms = stream_norms(segments)
    return [Site(f"{n}:{side}", n, side, "residual", i) for i, n in enumerate(norms) for side in ("input", "output")]


def stream_entries(segments: list[StreamSegment], ranks: list[int]) -> dict[str, dict]:
    """The reduction-map entries of a stream whose segments keep ``ranks`` directions (shapes only).

    Example:
        >>> entries = stream_entries(stream_segments(model), [120] * 12)  # doctest: +SKIP
    """
    norms = stream_norms(segments)
    entries = {}
    for j, norm in enumerate(norms):
        inside = j < len(segments)  # the last norm writes the full width for the heads
        entries[norm] = {"kind": "residual", "input_width": None if j == 0 else ranks[j - 1] + 1,
                         "width": ranks[j] + 1 if inside else None,
                         "readers": list(segments[j].readers) if inside else [],
                         "writers": list(segments[j].writers) if inside else []}
    return entries


def stream_widths(reductions: dict | None) -> dict[str, int]:
    """``{norm path: width}`` of every narrowed stream segment in a reduction map (empty when the stream is whole)."""
    return {norm: entry["width"] for norm, entry in (reductions or {}).items()
            if entry.get("kind") == "residual" and entry.get("width") is not None}


def _centred_basis(eigenvectors: torch.Tensor, k: int) -> torch.Tensor:
    """[U_k, 1/√d]: the top-k directions made exactly orthogonal to the all-ones vector, then the all-ones vector."""
    d = eigenvectors.shape[0]
    top = eigenvectors[:, :k] - eigenvectors[:, :k].mean(0, keepdim=True)
    top = torch.linalg.qr(top).Q
    return torch.cat([top, torch.full((d, 1), d**-0.5, dtype=top.dtype)], 1)


def stream_bases(statistics: dict, segments: list[StreamSegment]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per segment, the eigenvalues and eigenvectors of C (Σ_y + Σ_s) C / 2 (descending; float64).

    Args:
        statistics: ``{site name: CovarianceAccumulator}`` for the `stream_sites`.
        segments: from `stream_segments`.
    """
    spectra = []
    for segment in segments:
        joint = (statistics[f"{segment.norm}:output"].covariance()
                 + statistics[f"{segment.closing_norm}:input"].covariance()) / 2
        d = joint.shape[0]
        centring = torch.eye(d, dtype=joint.dtype) - 1.0 / d
        eigenvalues, eigenvectors = torch.linalg.eigh(centring @ joint @ centring)
        spectra.append((eigenvalues.flip(0), eigenvectors.flip(1)))
    return spectra


@torch.no_grad()
def narrow_residual_stream(model: nn.Module, statistics: dict, ranks: list[int],
                           spectra: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, dict]:
    """Cut every residual-stream segment of ``model`` (in place) to its rank; return the reduction-map entries.

    Args:
        model: a post-LayerNorm encoder (`POST_NORM_LAYOUTS`) whose stream Linears are still plain ``nn.Linear``
            (narrow the stream first, then cut inside the layers).
        statistics: ``{site name: CovarianceAccumulator}`` for the `stream_sites` of ``model``.
        ranks: k per segment (in `stream_segments` order), each in [1, d − 1].
        spectra: `stream_bases` of these statistics, if already computed.

    Returns:
        ``{norm path: residual entry}`` (see ``hf_rmtkd.modeling.layers_rmtkd``).
    """
    segments = stream_segments(model)
    if len(ranks) != len(segments):
        raise ValueError(f"narrow_residual_stream: {len(ranks)} ranks for {len(segments)} stream segments.")
    spectra = spectra or stream_bases(statistics, segments)
    norms = stream_norms(segments)
    d = get_submodule(model, norms[0]).normalized_shape[0]
    for j, k in enumerate(ranks):
        if not (isinstance(k, int) and 1 <= k <= d - 1):
            raise ValueError(
                f"residual rank of the stream after '{norms[j]}' must be an int in [1, {d - 1}], got {k!r}.")
    for path in (p for s in segments for p in (*s.readers, *s.writers)):
        if type(get_submodule(model, path)) is not nn.Linear:
            raise ValueError(f"residual: '{path}' is a {type(get_submodule(model, path)).__name__}; narrow the "
                             "residual stream before any other cut touches its Linears.")
    for path in (p for s in segments for p in s.readers):
        if get_submodule(model, path).bias is None:  # W μ has nowhere to go
            raise ValueError(f"residual: reader '{path}' has no bias to absorb the stream's mean.")
    bases = [_centred_basis(vectors, k) for (_, vectors), k in zip(spectra, ranks, strict=True)]
    means = [statistics[f"{s.norm}:output"].mean() for s in segments]
    entries = stream_entries(segments, ranks)
    for j, norm_path in enumerate(norms):
        entry = entries[norm_path]
        norm = get_submodule(model, norm_path)
        new = plan_residual(model, norm_path, entry)
        out_basis, out_mean = (bases[j], means[j]) if j < len(segments) else (torch.eye(d, dtype=torch.float64), 0.0)
        gamma = norm.weight.double() if norm.weight is not None else torch.ones(d, dtype=torch.float64)
        beta = norm.bias.double() if norm.bias is not None else torch.zeros(d, dtype=torch.float64)
        weights = {"bias": out_basis.T @ (beta - out_mean)}
        if j == 0:
            weights.update(weight=out_basis.T * gamma, offset=torch.zeros(out_basis.shape[1], dtype=torch.float64))
        else:
            basis, k = bases[j - 1], ranks[j - 1]
            centred_in = basis[:, :k]
            stream_in = statistics[f"{norm_path}:input"].mean()
            constant = stream_in - basis @ (basis.T @ (stream_in - means[j - 1]))  # o: the mean outside the basis
            constant = constant - constant.mean()  # C o
            shift = centred_in.T @ constant
            outside = constant - centred_in @ shift
            weights.update(weight=out_basis.T @ (gamma[:, None] * centred_in), offset=out_basis.T @ (gamma * outside),
                           shift=shift, outside_variance=outside.square().sum())
        _load(new[norm_path], weights)
        if j < len(segments):
            for reader in segments[j].readers:
                old = get_submodule(model, reader)
                W = old.weight.double()
                _load(new[reader], {"weight": W @ bases[j], "bias": old.bias.double() + W @ means[j]})
            for writer in segments[j].writers:
                old = get_submodule(model, writer)
                _load(new[writer], {"weight": bases[j].T @ old.weight.double(),
                                    **({"bias": bases[j].T @ old.bias.double()} if old.bias is not None else {})})
        for target, module in new.items():
            set_submodule(model, target, module)
    return entries


@torch.no_grad()
def hidden_state_coordinates(model: nn.Module, widths: dict[str, int], data, *, max_tokens: int | None = None,
                             batch_size: int = 32, collate_fn=None, accelerator=None,
                             progress: bool = True) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """How each hidden state of the whole-stream ``model`` maps into the coordinates its narrowed copy holds it in.

    A narrowed encoder holds the hidden state y after norm j as z = Bᵀ(y − μ), so feature distillation from the
    uncut model compares the student's z with Bᵀ(y_teacher − μ). The student's weights fold B and μ in, so they are
    rebuilt as `cut_residual_stream` built them: from the same calibration data run through the same uncut model, at
    the widths the student's reduction map records (`stream_widths`). `RMTKDTrainer` keeps them with each round, so a
    resumed run need not rebuild them.

    Args:
        model: the post-LayerNorm encoder before the stream was cut (the teacher).
        widths: ``{norm path: width}`` of the narrowed copy (k + 1 per segment).
        data, max_tokens, batch_size, collate_fn, accelerator, progress: the calibration data, as the cut used it.

    Returns:
        One entry per ``output_hidden_states`` tensor (the embeddings' norm, then every layer's output norm): (B, μ),
        float64, B of shape (d, width) and μ of shape (d,); None where the hidden state kept the full width (the last).

    Example:
        >>> widths = stream_widths(student.config.reductions)  # doctest: +SKIP
        >>> basis, mean = hidden_state_coordinates(teacher, widths, calibration_set)[0]  # doctest: +SKIP
        >>> z = (teacher_hidden[0] - mean) @ basis  # the student's first hidden state  # doctest: +SKIP
    """
    segments = stream_segments(model)
    norms = stream_norms(segments)
    statistics = collect_statistics(model, data, stream_sites(segments), max_tokens=max_tokens, batch_size=batch_size,
                                    collate_fn=collate_fn, accelerator=accelerator, progress=progress).accumulators
    spectra = stream_bases(statistics, segments)
    coordinates = []
    for j in range(0, len(norms), 2):  # the hidden states sit after the embeddings' norm and each layer's last norm
        width = widths.get(norms[j])
        if width is None:
            coordinates.append(None)
            continue
        basis = _centred_basis(spectra[j][1], width - 1)
        coordinates.append((basis, statistics[f"{norms[j]}:output"].mean()))
    return coordinates


def _load(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, value in tensors.items():
        parameter = getattr(module, name)
        parameter.copy_(value.to(parameter.dtype).reshape(parameter.shape))


def cut_residual_stream(model: nn.Module, data, *, estimator: str = "mp_fit", quantile: float = 0.5,
                        edge: str = "tracy_widom", effective_samples: str = "tokens", min_rank: int = 8,
                        max_tokens: int | None = None, batch_size: int = 32, collate_fn=None, accelerator=None,
                        progress: bool = True) -> tuple[dict[str, dict], dict[str, dict]]:
    """Measure the residual stream of ``model`` on ``data`` and cut every segment to its outlier count (in place).

    Each segment keeps k = the number of eigenvalues of its spectrum above the MP edge (`count_outliers` with the
    given σ² estimator, τ and edge), at least ``min_rank`` and at most d − 1. A ResNet keeps whole channels of each
    of its streams instead (`cut_residual_channels`, same arguments).

    Args:
        model: a post-LayerNorm encoder with no other cut yet (see `stream_segments`).
        data: calibration batches, as for `collect_statistics`.
        estimator, quantile, edge, effective_samples: the spectrum settings (as for every other site).
        min_rank: the fewest directions a segment keeps.
        max_tokens, batch_size, collate_fn, accelerator, progress: as for `collect_statistics`.

    Returns:
        ``(entries, sites)``: the reduction-map entries, and per segment (keyed by the norm that starts it)
        ``{"kind": "residual", "d", "k", "k_spectrum"}`` for the round log.

    Example:
        >>> entries, sites = cut_residual_stream(model, calibration_set)  # doctest: +SKIP
    """
    if getattr(getattr(model, "config", None), "model_type", None) in CHANNEL_STREAM_MODEL_TYPES:
        return cut_residual_channels(model, data, estimator=estimator, quantile=quantile, edge=edge,
                                     effective_samples=effective_samples, min_rank=min_rank, max_tokens=max_tokens,
                                     batch_size=batch_size, collate_fn=collate_fn, accelerator=accelerator,
                                     progress=progress)
    segments = stream_segments(model)
    statistics = collect_statistics(model, data, stream_sites(segments), max_tokens=max_tokens, batch_size=batch_size,
                                    collate_fn=collate_fn, accelerator=accelerator, progress=progress)
    spectra = stream_bases(statistics.accumulators, segments)
    first = statistics.accumulators[f"{segments[0].norm}:output"]
    n = first.count if effective_samples == "tokens" else statistics.n_sequences
    d = first.dim
    counts = [count_outliers(values, n, estimator=estimator, quantile=quantile, edge=edge).k for values, _ in spectra]
    ranks = [min(d - 1, max(k, min_rank)) for k in counts]
    entries = narrow_residual_stream(model, statistics.accumulators, ranks, spectra)
    sites = {segment.norm: {"kind": "residual", "d": d, "k": rank, "k_spectrum": k}
             for segment, rank, k in zip(segments, ranks, counts, strict=True)}
    return entries, sites
