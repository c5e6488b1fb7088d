"""Reduced layers of an RMT-KD checkpoint and the shape-only builders that install them.

This file is copied flat into every saved checkpoint (next to ``modeling_rmtkd.py``), so it imports only torch,
transformers and the standard library. The data-driven surgery that fills these layers with weights computed from
calibration statistics lives in ``hf_rmtkd.reductions``; here we only create modules of the right shapes from a
reduction-map entry, which is all ``from_pretrained`` needs (transformers 5.x builds the skeleton on the meta device
and loads the weights afterwards).

A reduction map is ``{module path: entry}``, with module paths relative to the wrapped base model:

- ``{"kind": "low_rank", "rank": k}``: an ``nn.Linear`` / GPT-2 ``Conv1D`` / ``nn.Conv2d`` becomes a
  :class:`LowRankLinear` / :class:`LowRankConv2d`. Layers that read the same input (q/k/v) share one projection: the
  first holds it, the others' entries add ``"shares_projection_with": <the first's path>`` and hold only their
  up-projection (format version 2).
- ``{"kind": "ffn_width", "width": k, "producers": [...]}``: the producers' output dim and the consumer's input dim
  become k; they stay plain ``nn.Linear`` / ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.LayerNorm``.
- ``{"kind": "attention_heads", "width": h·head_dim, "head_dim": head_dim, "producers": [q, k, v], "heads": [...]}``:
  an attention block keeps h whole heads (``heads``, for the record): q/k/v output and the output projection's input
  become h·head_dim; they stay plain ``nn.Linear`` (BERT-family attention infers its head count from that width).
- ``{"kind": "embedding", "rank": k}``: an ``nn.Embedding(V, d)`` becomes a :class:`LowRankEmbedding`. With
  ``"rows": N`` it stores codes for N tokens only, and a token → row table (format version 3).
- ``{"kind": "residual", "input_width": r_in | None, "width": r_out | None, "readers": [...], "writers": [...]}``:
  a post-LayerNorm becomes a :class:`ReducedLayerNorm` that reads the residual stream in r_in coordinates (None: the
  full hidden size) and writes it in r_out coordinates (None: full); the Linears reading its output (``readers``) and
  those adding into the same stream before the next norm (``writers``) are resized to r_out (format version 4).
- ``{"kind": "residual_channels", "width": k, "writers": [...], "readers": [...]}``, keyed by the first writer: a
  ResNet's residual stream keeps k whole channels; its writers (``nn.Conv2d`` / ``nn.BatchNorm2d``) output k and its
  readers (``nn.Conv2d`` / ``nn.Linear``) read k; they stay plain modules (format version 6).
- ``{"kind": "folded_batchnorm", "into": <conv path>}``, keyed by a ``BatchNorm2d``'s path: the norm became
  ``nn.Identity`` and its inference-time affine map lives in the convolution before it, which gains a bias (format
  version 5). Installed last, so the convolution has whatever width the other entries gave it.
- ``{"kind": "folded_embeddings", "rank": r, "width": k + 1, "rows": N | None}``, keyed by the ``embeddings`` module
  of a post-LayerNorm encoder whose token embedding is a :class:`LowRankEmbedding` and whose LayerNorm starts a
  narrowed stream: the module becomes :class:`FoldedEmbeddings` (:class:`FoldedDistilBertEmbeddings`), which writes
  the stream's coordinates without a d-wide sum (format version 7). Installed last, after the entries that factor
  the token embedding and narrow the stream.
"""

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class ModulePathError(KeyError, ValueError):
    """A reduction names a module the model does not have, or one of a type the reduction cannot handle.

    Subclasses both ``KeyError`` (a missing name) and ``ValueError`` (a bad argument) so callers may catch either.
    """

    def __str__(self):
        # KeyError.__str__ would wrap the message in quotes.
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------------------------------------------------
# Module paths


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """Return the submodule at a dotted path, with an error that names the path when it is missing.

    Args:
        model: the model to search.
        path: dotted module path relative to ``model``, e.g. ``"bert.encoder.layer.0.output.dense"``.

    Returns:
        The submodule.
    """
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise ModulePathError(
            f"Module '{path}' was not found in {type(model).__name__}: the reduction map must name module paths "
            f"relative to the base model (see `model.named_modules()`). ({err})"
        ) from None


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted path (which must already exist) by ``module``, in the same train/eval mode.

    Args:
        model: the model to modify in place.
        path: dotted module path relative to ``model``.
        module: the new module.
    """
    old = get_submodule(model, path)
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(model, parent_path) if parent_path else model
    # A fresh module is in training mode; a BatchNorm left so in an eval model would normalise with batch statistics.
    setattr(parent, name, module.train(old.training))


def _factory(module: nn.Module, device=None) -> dict:
    """Device and floating dtype of a module's tensors, so replacements land where the original lived.

    ``device`` overrides the device (``"meta"`` to size a replacement without allocating it).
    """
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return {"device": device or tensor.device, "dtype": tensor.dtype}
    return {"device": device}


def conv_like(old: nn.Conv2d, in_channels: int, out_channels: int, *, bias: bool, **factory) -> nn.Conv2d:
    """An ``nn.Conv2d`` with ``old``'s kernel, stride, padding, dilation, groups and padding mode, and the given
    channels and bias (``factory``: ``device`` / ``dtype``)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=old.kernel_size, stride=old.stride, padding=old.padding,
                     dilation=old.dilation, groups=old.groups, bias=bias, padding_mode=old.padding_mode, **factory)


# ---------------------------------------------------------------------------------------------------------------------
# Reduced modules


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a linear map factored through ``rank`` directions of its input.

    ``down`` holds the projection P (rank × in_features, no bias); ``up`` holds W Pᵀ (out_features × rank) and a bias
    that also carries the centring term W (I − PᵀP) μ. Parameters: rank·(in + out) + out.

    Layers that read the same input (q/k/v of one attention) share one P: the first holds ``down``, the others are
    built with ``shares_projection=True`` (no ``down``, rank·out + out parameters) and linked to it with
    :meth:`read_projection_of`. Within a forward pass the siblings receive the very same input tensor, so P x is
    computed once and handed to each of them (see :meth:`project`).

    Args:
        in_features: d_in.
        out_features: d_out.
        rank: k, the number of kept input directions.
        shares_projection: build without ``down``; :meth:`read_projection_of` must link the layer holding it.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, shares_projection: bool = False, device=None,
                 dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.shares_projection = shares_projection
        if not shares_projection:
            self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=True, device=device, dtype=dtype)
        # Plain attributes, not submodules: the holder of P is registered once, where it lives in the model.
        object.__setattr__(self, "_projector", None if shares_projection else self)
        self._readers = 1  # layers reading this layer's P x in one forward pass (itself included)
        self._memo = None  # (input, grad enabled, P x, readers still to serve)

    def read_projection_of(self, holder: "LowRankLinear") -> None:
        """Read P x from ``holder`` (a layer of the same input and rank that holds ``down``) instead of a copy of P."""
        if not self.shares_projection or holder.shares_projection:
            raise ValueError("read_projection_of links a layer built with shares_projection=True to one holding P.")
        if (holder.in_features, holder.rank) != (self.in_features, self.rank):
            raise ValueError(
                f"Cannot share a projection of shape ({holder.rank}, {holder.in_features}) with a layer of rank "
                f"{self.rank} over {self.in_features} inputs."
            )
        if self._projector is holder:  # linked already (e.g. by the surgery, then by the map): one reader still
            return
        object.__setattr__(self, "_projector", holder)
        holder._readers += 1

    def project(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., rank)
        """P x, computed once per input tensor for all the layers sharing this projection.

        The product is kept only until each reader has taken it, and only for the same tensor object under the same
        grad mode, so a new input (or a recomputation under gradient checkpointing) always gets a fresh product.
        """
        memo, grad = self._memo, torch.is_grad_enabled()
        if memo is not None and memo[0] is x and memo[1] == grad:
            self._memo = (*memo[:3], memo[3] - 1) if memo[3] > 1 else None
            return memo[2]
        projected = self.down(x)
        self._memo = (x, grad, projected, self._readers - 1) if self._readers > 1 else None
        return projected

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        if self._projector is None:
            raise RuntimeError(
                "This LowRankLinear shares another layer's projection but was never linked to it; build reduced "
                "models with apply_reduction_map (or from_pretrained), which links every 'shares_projection_with'."
            )
        return self.up(self._projector.project(x))

    def __getstate__(self):
        # A pending P x may be a non-leaf tensor, which deepcopy (the teacher copy, rollbacks) cannot copy.
        return {**super().__getstate__(), "_memo": None}

    def extra_repr(self) -> str:
        shared = ", shares_projection=True" if self.shares_projection else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{shared}"


class LowRankConv2d(nn.Module):
    """A ``Conv2d`` that first projects its input channels onto ``rank`` directions with a 1×1 convolution.

    ``down`` is the 1×1 projection P (rank × in_channels, no bias); ``conv`` is the original convolution with ``rank``
    input channels and a bias (the centring term). Parameters: rank·in + out·rank·kh·kw + out.

    Args:
        conv: the convolution being replaced (only its hyper-parameters are read; groups must be 1).
        rank: k, the number of kept input-channel directions.
    """

    def __init__(self, conv: nn.Conv2d, rank: int, device=None, dtype=None):
        super().__init__()
        self.in_channels, self.out_channels, self.rank = conv.in_channels, conv.out_channels, rank
        self.down = nn.Conv2d(conv.in_channels, rank, kernel_size=1, bias=False, device=device, dtype=dtype)
        self.conv = conv_like(conv, rank, conv.out_channels, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, c_in, H, W) -> (B, c_out, H', W')
        return self.conv(self.down(x))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, rank={self.rank}"


class LowRankEmbedding(nn.Module):
    """A token embedding stored as ``rank``-dimensional codes plus an up-projection: ``E[v] ≈ up(E'[v])``.

    ``embed`` is ``nn.Embedding(V, rank)`` holding E Pᵀ (keeps ``padding_idx``); ``up`` is ``nn.Linear(rank, d)``
    holding Pᵀ and the centring term (I − PᵀP) μ as its bias. ``num_embeddings`` / ``embedding_dim`` /
    ``padding_idx`` mirror ``nn.Embedding`` for code that reads them from ``get_input_embeddings()``.

    With ``rows`` = N < V, ``embed`` holds codes for N tokens only (those the training data uses) and the buffer
    ``token_rows`` (V,) maps every token id to its row: a kept token to its own, any other to the row of the kept
    token nearest to it in the original embedding.

    Args:
        num_embeddings: V, the vocabulary size.
        embedding_dim: d, the output width (the model's hidden size).
        rank: k.
        padding_idx: as in ``nn.Embedding``.
        rows: N, the stored codes; None stores one per token (N = V, no table).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx=None, rows: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank, self.rows = num_embeddings, embedding_dim, rank, rows
        self._padding_idx = padding_idx
        # With a token -> row table the padding token's row is wherever the table puts it: no padding_idx there.
        self.embed = nn.Embedding(num_embeddings if rows is None else rows, rank,
                                  padding_idx=padding_idx if rows is None else None, device=device, dtype=dtype)
        self.up = nn.Linear(rank, embedding_dim, bias=True, device=device, dtype=dtype)
        if rows is not None:
            self.register_buffer("token_rows", torch.zeros(num_embeddings, dtype=torch.int32, device=device))

    @property
    def padding_idx(self):
        return self._padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., d)
        rows = input_ids if self.rows is None else self.token_rows[input_ids]
        return self.up(self.embed(rows))

    def extra_repr(self) -> str:
        stored = "" if self.rows is None else f", rows={self.rows}"
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, rank={self.rank}{stored}"


class ReducedLayerNorm(nn.Module):
    """A post-LayerNorm of a residual stream held in a basis of its top directions (the ``residual`` kind).

    Between two post-LayerNorms the stream is stored as coordinates z in an orthonormal basis B = [U, 1/√d]: U (d×r)
    holds the stream's top eigen-directions with the all-ones direction removed, and the last coordinate carries the
    per-token mean, which the readers need but LayerNorm's centring discards. The norm therefore sees the centred
    stream as ``U (z[:r] + shift) + o⊥``: ``shift`` and the constant o⊥ (orthogonal to U, entering only through its
    squared length ``outside_variance``) carry the stream's mean. The variance over the d features is then exact in r
    numbers, and the normalised vector, scaled by γ and moved into the next basis, is one (r_out × r) product::

        x = z[..., :r] + shift;   σ = sqrt((|x|² + outside_variance) / d + eps)
        out = (x Wᵀ + offset) / σ + bias

    With ``full_input`` the input is the ordinary d-wide stream (the embeddings' sum), centred as LayerNorm does.

    Args:
        hidden_size: d, the width the original LayerNorm normalised.
        input_width: the input's width: r + 1 coordinates, or d with ``full_input``.
        output_width: the output's width: the next basis' r' + 1 coordinates, or d for a full-width output.
        full_input: the input is a full d-wide vector rather than basis coordinates.
        eps: LayerNorm's epsilon.
    """

    def __init__(self, hidden_size: int, input_width: int, output_width: int, full_input: bool = False,
                 eps: float = 1e-12, device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.input_width, self.output_width = hidden_size, input_width, output_width
        self.full_input, self.eps = full_input, eps
        normalised = input_width if full_input else input_width - 1  # the mean coordinate is not normalised
        kwargs = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(output_width, normalised, **kwargs))
        self.bias = nn.Parameter(torch.zeros(output_width, **kwargs))
        self.offset = nn.Parameter(torch.zeros(output_width, **kwargs))
        if not full_input:
            self.shift = nn.Parameter(torch.zeros(normalised, **kwargs))
            self.outside_variance = nn.Parameter(torch.zeros((), **kwargs))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A LayerNorm (γ = 1, β = 0) of the leading coordinates: a defined start where no cut sets the weights (a
        model built from its config), never the uninitialised memory of ``torch.empty``."""
        nn.init.eye_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., input_width) -> (..., output_width)
        # The variance in float32 whatever the compute dtype, as LayerNorm does under autocast.
        if self.full_input:
            # One reduction for both moments: squaring the centred stream would hold another d-wide tensor, and at
            # the embeddings that is the largest activation left once the stream is cut.
            variance, mean = torch.var_mean(x.float(), dim=-1, keepdim=True, correction=0)
            x = x - mean.to(x.dtype)
        else:
            x = x[..., :-1] + self.shift
            variance = (x.float().square().sum(-1, keepdim=True) + self.outside_variance.float()) / self.hidden_size
        scale = torch.rsqrt(variance + self.eps).to(x.dtype)
        return (nn.functional.linear(x, self.weight) + self.offset) * scale + self.bias

    def extra_repr(self) -> str:
        full = ", full_input=True" if self.full_input else ""
        return (f"hidden_size={self.hidden_size}, input_width={self.input_width}, "
                f"output_width={self.output_width}{full}, eps={self.eps}")


class FoldedEmbeddings(nn.Module):
    """A post-LayerNorm encoder's embeddings summed and normalised straight into its narrowed stream (inference form).

    With the ``embedding`` and ``residual`` kinds, the embeddings of BERT (RoBERTa, XLM-R, CamemBERT, DistilBERT) add a
    token's up-projected code U e + b, its position's and its token type's embeddings into a d-wide sum s = U e + c,
    and the `ReducedLayerNorm` after them (W, offset, bias) moves the normalised sum into the first segment's k + 1
    coordinates. Centring is linear (C = I − 11ᵀ/d), so neither the variance nor the output needs s itself::

        σ² = (eᵀ G e + 2 eᵀ h_c + |C c|²) / d,   G = (CU)ᵀ CU,   h_c = (CU)ᵀ C c
        out = (W C U e + W C c + offset) / sqrt(σ² + eps) + bias

    G (``gram``) and W C U (``reader``) are fixed; h_c (``cross``), |C c|² (``constant``) and W C c + offset
    (``offsets``) are tables with one row per (token type, position) pair. The function is the same, but every tensor
    it makes is r or k + 1 wide instead of d: on MiniLM-L6 with the ``residual`` kind that removes the widest
    activations before the last layer and makes batch-32 inference on CPU a few percent faster.

    The tables are derived from U, which the codes do not change: the codes may still train, the tables do not. It
    reads token ids; ``inputs_embeds`` has no code to read.

    Args:
        num_embeddings: V, the vocabulary size.
        rank: r, the width of a token's code.
        width: k + 1, the first stream segment's width.
        hidden_size: d, the width the embeddings' LayerNorm normalised.
        max_position_embeddings, type_vocab_size: the sizes of the position and token-type tables (1 type for a
            model without token types, such as DistilBERT).
        rows: N, the stored codes (with a token -> row table, as in `LowRankEmbedding`); None stores one per token.
        padding_idx: the token embedding's padding index.
        position_padding_idx: RoBERTa's rule: positions count the non-padding tokens from this index on (None:
            positions are 0, 1, 2, ... as in BERT).
        eps, dropout: as in the modules replaced.
    """

    def __init__(self, num_embeddings: int, rank: int, width: int, hidden_size: int, max_position_embeddings: int,
                 type_vocab_size: int = 1, rows: int | None = None, padding_idx=None, position_padding_idx=None,
                 eps: float = 1e-12, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        kwargs = {"device": device, "dtype": dtype}
        self.hidden_size, self.eps, self.rows, self.positions = hidden_size, eps, rows, max_position_embeddings
        self.position_padding_idx = position_padding_idx
        # ``word_embeddings`` is what ``get_input_embeddings()`` returns: the codes, one row of r numbers per token.
        self.word_embeddings = nn.Embedding(num_embeddings if rows is None else rows, rank,
                                            padding_idx=padding_idx if rows is None else None, **kwargs)
        if rows is not None:
            self.register_buffer("token_rows", torch.zeros(num_embeddings, dtype=torch.int32, device=device))
        pairs = type_vocab_size * max_position_embeddings
        self.gram = nn.Parameter(torch.zeros(rank, rank, **kwargs), requires_grad=False)
        self.cross = nn.Parameter(torch.zeros(pairs, rank, **kwargs), requires_grad=False)
        self.constant = nn.Parameter(torch.ones(pairs, **kwargs), requires_grad=False)
        self.reader = nn.Parameter(torch.zeros(width, rank, **kwargs), requires_grad=False)
        self.offsets = nn.Parameter(torch.zeros(pairs, width, **kwargs), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(width, **kwargs), requires_grad=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, cache_length=0):
        """BERT's and RoBERTa's call: (input_ids, token_type_ids, position_ids, inputs_embeds, cache_length)."""
        if input_ids is None:
            raise ValueError("FoldedEmbeddings reads token ids (input_ids): folded embeddings store r-dimensional "
                             "codes, so there is nothing to read inputs_embeds into.")
        if position_ids is None:  # made here: a buffer would be left uninitialised by from_pretrained's meta skeleton
            if self.position_padding_idx is None:
                position_ids = torch.arange(cache_length, cache_length + input_ids.shape[1], device=input_ids.device)
            else:  # RoBERTa: padding keeps the padding index, the other tokens count on from it
                tokens = input_ids.ne(self.position_padding_idx).long()
                position_ids = (tokens.cumsum(1) + cache_length) * tokens + self.position_padding_idx
        if token_type_ids is None:  # the default everywhere: type 0
            token_type_ids = torch.zeros_like(input_ids)
        codes = self.word_embeddings(input_ids if self.rows is None else self.token_rows[input_ids])
        pair = token_type_ids * self.positions + position_ids  # the row of the (token type, position) tables
        # The variance in float32 whatever the compute dtype, as LayerNorm does under autocast.
        wide = codes.float()
        variance = ((wide @ self.gram.float() + 2 * self.cross.float()[pair]) * wide).sum(-1, keepdim=True)
        variance = (variance + self.constant.float()[pair].unsqueeze(-1)) / self.hidden_size
        scale = torch.rsqrt(variance + self.eps).to(codes.dtype)
        output = torch.addcmul(self.bias, nn.functional.linear(codes, self.reader) + self.offsets[pair], scale)
        return self.dropout(output)

    def extra_repr(self) -> str:
        stored = "" if self.rows is None else f", rows={self.rows}"
        return (f"rank={self.word_embeddings.embedding_dim}, width={self.reader.shape[0]}, "
                f"hidden_size={self.hidden_size}{stored}, eps={self.eps}")


class FoldedDistilBertEmbeddings(FoldedEmbeddings):
    """`FoldedEmbeddings` called as DistilBERT calls its embeddings: (input_ids, inputs_embeds, position_ids)."""

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None):
        return super().forward(input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)


# ---------------------------------------------------------------------------------------------------------------------
# Shape-only builders: entry -> {path: new module}. They read shapes from the modules they replace, never weights,
# so they run on the meta device.


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear`` or GPT-2 ``Conv1D`` (whose weight is stored transposed, d_in × d_out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(type(module).__name__)


def _check_rank(path: str, rank, full: int, what: str) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= full:
        raise ValueError(f"Reduction of '{path}': {what} must be an int in [1, {full}], got {rank!r}.")
    return rank


def plan_low_rank(model: nn.Module, path: str, entry: dict, device=None) -> dict[str, nn.Module]:
    """Shape-only replacement for a ``low_rank`` entry: ``{path: LowRankLinear | LowRankConv2d}``."""
    old = get_submodule(model, path)
    kwargs = _factory(old, device)
    shares = "shares_projection_with" in entry
    if isinstance(old, (nn.Linear, Conv1D)):
        d_in, d_out = linear_shape(old)
        rank = _check_rank(path, entry.get("rank"), d_in, "'rank'")
        return {path: LowRankLinear(d_in, d_out, rank, shares_projection=shares, **kwargs)}
    if shares:
        raise ModulePathError(f"low_rank '{path}': only nn.Linear / Conv1D layers can share a projection.")
    if isinstance(old, nn.Conv2d):
        if old.groups != 1:
            raise ModulePathError(f"low_rank cannot reduce '{path}': grouped convolutions (groups={old.groups}).")
        rank = _check_rank(path, entry.get("rank"), old.in_channels, "'rank'")
        return {path: LowRankConv2d(old, rank, **kwargs)}
    raise ModulePathError(
        f"low_rank cannot reduce '{path}': it is a {type(old).__name__}, expected nn.Linear, Conv1D or nn.Conv2d."
    )


def producer_width(path: str, module: nn.Module) -> int:
    """The output dim of an FFN producer: Linear out_features, Conv2d out_channels, BatchNorm2d/LayerNorm features."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.out_channels
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    raise ModulePathError(
        f"ffn_width cannot narrow producer '{path}': it is a {type(module).__name__}, expected nn.Linear, nn.Conv2d "
        "(groups=1), nn.BatchNorm2d or a 1-d nn.LayerNorm."
    )


def _with_output_width(old: nn.Module, width: int, device=None) -> nn.Module:
    """A module like ``old`` (a producer already checked by :func:`producer_width`) with output width ``width``."""
    kwargs = _factory(old, device)
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, width, bias=old.bias is not None, **kwargs)
    if isinstance(old, nn.Conv2d):
        return conv_like(old, old.in_channels, width, bias=old.bias is not None, **kwargs)
    if isinstance(old, nn.BatchNorm2d):
        return nn.BatchNorm2d(
            width, old.eps, old.momentum, affine=old.affine, track_running_stats=old.track_running_stats, **kwargs
        )
    has_bias = old.elementwise_affine and old.bias is not None
    return nn.LayerNorm(width, eps=old.eps, elementwise_affine=old.elementwise_affine, bias=has_bias, **kwargs)


def consumer_width(path: str, module: nn.Module) -> int:
    """The input dim of an FFN consumer: ``nn.Linear`` in_features or ``nn.Conv2d`` (groups=1) in_channels."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.in_channels
    raise ModulePathError(
        f"ffn_width cannot narrow consumer '{path}': it is a {type(module).__name__}, expected nn.Linear or "
        "nn.Conv2d (groups=1)."
    )


def _with_input_width(old: nn.Module, width: int, device=None) -> nn.Module:
    """A module like ``old`` (a consumer already checked by :func:`consumer_width`) with input width ``width``."""
    kwargs = _factory(old, device)
    if isinstance(old, nn.Linear):
        return nn.Linear(width, old.out_features, bias=old.bias is not None, **kwargs)
    return conv_like(old, width, old.out_channels, bias=old.bias is not None, **kwargs)


def plan_ffn_width(model: nn.Module, path: str, entry: dict, device=None) -> dict[str, nn.Module]:
    """Shape-only replacements for an ``ffn_width`` entry: the consumer at ``path`` and every producer."""
    kind = entry.get("kind", "ffn_width")
    producers = entry.get("producers")
    if not producers or not isinstance(producers, (list, tuple)):
        raise ValueError(f"{kind} entry for '{path}' needs a non-empty 'producers' list of module paths.")
    consumer = get_submodule(model, path)
    d_inner = consumer_width(path, consumer)
    width = _check_rank(path, entry.get("width"), d_inner, "'width'")
    plan = {path: _with_input_width(consumer, width, device)}
    for producer in producers:
        module = get_submodule(model, producer)
        if producer_width(producer, module) != d_inner:
            raise ValueError(
                f"{kind} entry for '{path}': producer '{producer}' outputs {producer_width(producer, module)} "
                f"features but the consumer reads {d_inner}."
            )
        plan[producer] = _with_output_width(module, width, device)
    return plan


def plan_attention_heads(model: nn.Module, path: str, entry: dict, device=None) -> dict[str, nn.Module]:
    """Shape-only replacements for an ``attention_heads`` entry: the output projection at ``path`` and q/k/v.

    The shapes are those of an ``ffn_width`` cut whose width is a whole number of heads.
    """
    head_dim, width = entry.get("head_dim"), entry.get("width")
    whole = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (head_dim, width))
    if not whole or width % head_dim:
        raise ValueError(
            f"attention_heads entry for '{path}': 'width' ({width!r}) must be a positive multiple of 'head_dim' "
            f"({head_dim!r}), the features of one head."
        )
    return plan_ffn_width(model, path, entry, device)


def tied_embedding_error(model: nn.Module, path: str, embedding: nn.Embedding) -> str | None:
    """A message if ``embedding`` shares its weight with an output head (so a factored embedding would untie it)."""
    weight_key = f"{path}.weight"
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shares_weight = output is not None and getattr(output, "weight", None) is embedding.weight
    if shares_weight or weight_key in tied or weight_key in tied.values():
        return (
            f"embedding cannot reduce '{path}': its weight is tied to the output layer (tie_word_embeddings). "
            "Factoring it would silently untie the LM head; leave this embedding out of the reduction map."
        )
    return None


def plan_embedding(model: nn.Module, path: str, entry: dict, device=None) -> dict[str, nn.Module]:
    """Shape-only replacement for an ``embedding`` entry: ``{path: LowRankEmbedding}``."""
    old = get_submodule(model, path)
    if not isinstance(old, nn.Embedding):
        raise ModulePathError(f"embedding cannot reduce '{path}': it is a {type(old).__name__}, not nn.Embedding.")
    if (message := tied_embedding_error(model, path, old)) is not None:
        raise ValueError(message)
    rank = _check_rank(path, entry.get("rank"), old.embedding_dim, "'rank'")
    rows = entry.get("rows")
    if rows is not None and not (isinstance(rows, int) and 1 <= rows <= old.num_embeddings):
        raise ValueError(f"embedding '{path}': 'rows' must be an integer in [1, {old.num_embeddings}], got {rows!r}.")
    kwargs = _factory(old, device)
    new = LowRankEmbedding(old.num_embeddings, old.embedding_dim, rank, padding_idx=old.padding_idx, rows=rows,
                           **kwargs)
    return {path: new}


def plan_residual(model: nn.Module, path: str, entry: dict, device=None) -> dict[str, nn.Module]:
    """Shape-only replacements for a ``residual`` entry: the LayerNorm at ``path``, its readers and the writers."""
    norm = get_submodule(model, path)
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise ModulePathError(
            f"residual cannot reduce '{path}': it is a {type(norm).__name__}, not a 1-d nn.LayerNorm.")
    d = norm.normalized_shape[0]
    widths = {}
    for field in ("input_width", "width"):
        value = entry.get(field)
        widths[field] = d if value is None else _check_rank(path, value, d, f"'{field}'")
    full_input = entry.get("input_width") is None
    plan = {path: ReducedLayerNorm(d, widths["input_width"], widths["width"], full_input=full_input, eps=norm.eps,
                                   **_factory(norm, device))}
    plan.update(_resized(model, path, "residual", "reader", entry.get("readers", []), d, widths["width"], device))
    for writer in entry.get("writers", []):
        module = get_submodule(model, writer)
        if not isinstance(module, nn.Linear) or module.out_features != d:
            raise ValueError(f"residual entry for '{path}': writer '{writer}' must be an nn.Linear writing the "
                             f"stream's {d} features.")
        plan[writer] = _with_output_width(module, widths["width"], device)
    return plan


def plan_residual_channels(model: nn.Module, path: str, entry: dict, device=None) -> dict[str, nn.Module]:
    """Shape-only replacements for a ``residual_channels`` entry: every writer and reader of the stream."""
    writers, readers = entry.get("writers"), entry.get("readers")
    if not writers or not readers or not all(isinstance(v, (list, tuple)) for v in (writers, readers)):
        raise ValueError(f"residual_channels entry for '{path}' needs non-empty 'writers' and 'readers' lists of "
                         "module paths.")
    d = producer_width(writers[0], get_submodule(model, writers[0]))
    width = _check_rank(path, entry.get("width"), d, "'width'")
    return {**_resized(model, path, "residual_channels", "writer", writers, d, width, device),
            **_resized(model, path, "residual_channels", "reader", readers, d, width, device)}


def _resized(model: nn.Module, entry_path: str, kind: str, role: str, paths, d: int, width: int,
             device=None) -> dict[str, nn.Module]:
    """``{path: module}`` for a stream's readers (input resized) or writers (output resized) from ``d`` to ``width``.

    Raises:
        ValueError: a module does not read (write) the stream's ``d`` features; the message names it.
    """
    measure, resize, verb = ((consumer_width, _with_input_width, "reads") if role == "reader"
                             else (producer_width, _with_output_width, "outputs"))
    plan = {}
    for path in paths:
        module = get_submodule(model, path)
        if measure(path, module) != d:
            raise ValueError(f"{kind} entry for '{entry_path}': {role} '{path}' {verb} {measure(path, module)} "
                             f"features, not the stream's {d}.")
        plan[path] = resize(module, width, device)
    return plan


def plan_folded_batchnorm(model: nn.Module, path: str, entry: dict, device=None) -> dict[str, nn.Module]:
    """Shape-only replacements for a ``folded_batchnorm`` entry: ``nn.Identity`` at ``path``, a biased conv at
    ``entry["into"]``."""
    norm, into = get_submodule(model, path), entry.get("into")
    if not isinstance(norm, nn.BatchNorm2d):
        raise ModulePathError(f"folded_batchnorm '{path}': it is a {type(norm).__name__}, not nn.BatchNorm2d.")
    if not isinstance(into, str):
        raise ValueError(f"folded_batchnorm entry for '{path}' needs 'into', the path of the convolution before it.")
    conv = get_submodule(model, into)
    if type(conv) is not nn.Conv2d or conv.out_channels != norm.num_features:
        raise ModulePathError(
            f"folded_batchnorm '{path}': '{into}' must be an nn.Conv2d with {norm.num_features} output channels, "
            f"got {type(conv).__name__}{f' with {conv.out_channels}' if isinstance(conv, nn.Conv2d) else ''}."
        )
    return {path: nn.Identity(), into: conv_like(conv, conv.in_channels, conv.out_channels, bias=True,
                                                 **_factory(conv, device))}


def plan_folded_embeddings(model: nn.Module, path: str, entry: dict, device=None) -> dict[str, nn.Module]:
    """Shape-only replacement for a ``folded_embeddings`` entry: ``{path: FoldedEmbeddings}`` (the DistilBERT
    variant, whose embeddings have no token types, `FoldedDistilBertEmbeddings`)."""
    embeddings = get_submodule(model, path)
    words = getattr(embeddings, "word_embeddings", None)
    norm = getattr(embeddings, "LayerNorm", None)
    if not (isinstance(words, LowRankEmbedding) and isinstance(norm, ReducedLayerNorm) and norm.full_input):
        raise ModulePathError(
            f"folded_embeddings '{path}': needs embeddings whose 'word_embeddings' is a LowRankEmbedding (the "
            "embedding kind) and whose 'LayerNorm' starts a narrowed stream (the residual kind); got "
            f"{type(embeddings).__name__} with {type(words).__name__} and {type(norm).__name__}.")
    rank, width, rows = entry.get("rank"), entry.get("width"), entry.get("rows")
    if (rank, width, rows) != (words.rank, norm.output_width, words.rows):
        raise ValueError(f"folded_embeddings '{path}': the entry's rank {rank}, width {width} and rows {rows} must be "
                         f"the model's: {words.rank}, {norm.output_width} and {words.rows}.")
    positions, types = embeddings.position_embeddings, getattr(embeddings, "token_type_embeddings", None)
    folded = FoldedEmbeddings if types is not None else FoldedDistilBertEmbeddings
    new = folded(words.num_embeddings, rank, width, norm.hidden_size, positions.num_embeddings,
                 1 if types is None else types.num_embeddings, rows=rows, padding_idx=words.padding_idx,
                 position_padding_idx=positions.padding_idx, eps=norm.eps, dropout=embeddings.dropout.p,
                 **_factory(words.embed, device))
    return {path: new}


PLANNERS = {
    "low_rank": plan_low_rank,
    "ffn_width": plan_ffn_width,
    "attention_heads": plan_attention_heads,
    "embedding": plan_embedding,
    "residual": plan_residual,
    "residual_channels": plan_residual_channels,
    "folded_batchnorm": plan_folded_batchnorm,
    "folded_embeddings": plan_folded_embeddings,
}
# Kinds that resize a producer's output (e.g. ``intermediate.dense``, ``query``), which a ``low_rank`` entry may then
# factor: they are installed first.
WIDTH_KINDS = ("ffn_width", "attention_heads")


def install_order(kind: str) -> int:
    """Width cuts first, then the residual stream (it resizes the other side of the same layers), then factoring,
    then folding (BatchNorm into convolutions at their final width, embeddings into a factored, narrowed stream)."""
    folds = {"folded_batchnorm": 3, "folded_embeddings": 3}
    return {**dict.fromkeys(WIDTH_KINDS, 0), "residual": 1, "residual_channels": 1, **folds}.get(kind, 2)


def plan_reduction(model: nn.Module, path: str, entry: dict, device=None) -> dict[str, nn.Module]:
    """The new modules one map entry installs, ``{module path: module}``, without installing them.

    Args:
        model: the base model (only shapes, dtypes and devices are read).
        path: the entry's module path (for ``ffn_width``, the consumer).
        entry: the map entry.
        device: where to create the modules; default: where the replaced ones live (``"meta"`` to only size them).

    Returns:
        ``{path: new module}`` for every module the entry replaces.
    """
    kind = entry.get("kind") if isinstance(entry, dict) else None
    if kind not in PLANNERS:
        raise ValueError(f"Reduction map entry for '{path}' has unknown kind {kind!r}; known: {sorted(PLANNERS)}.")
    return PLANNERS[kind](model, path, entry, device)


def build_reduction(model: nn.Module, path: str, entry: dict) -> nn.Module:
    """Install the reduced module(s) of one map entry, with fresh (uninitialised) weights of the right shapes.

    Args:
        model: the base model, modified in place.
        path: the entry's module path (for ``ffn_width``, the consumer).
        entry: the map entry (``kind`` plus ``rank`` / ``width`` / ``producers``).

    Returns:
        The new module at ``path``.
    """
    for target, module in plan_reduction(model, path, entry).items():
        set_submodule(model, target, module)
    return get_submodule(model, path)


def link_shared_projection(model: nn.Module, path: str, entry: dict) -> None:
    """Link the layer at ``path`` to the layer whose projection its entry says it shares (no-op for other entries).

    Raises:
        ValueError: the named holder is missing, not a low-rank layer holding a projection, or of another shape.
    """
    holder_path = entry.get("shares_projection_with") if isinstance(entry, dict) else None
    if holder_path is None:
        return
    holder = get_submodule(model, holder_path)
    if not isinstance(holder, LowRankLinear) or holder.shares_projection:
        raise ValueError(
            f"Reduction of '{path}' shares the projection of '{holder_path}', which is a {type(holder).__name__} "
            "without one of its own; its entry must be a plain low_rank entry of the same rank."
        )
    get_submodule(model, path).read_projection_of(holder)


def apply_reduction_map(model: nn.Module, reductions: dict) -> None:
    """Install every entry of a reduction map (shapes only) into ``model``, `WIDTH_KINDS` entries first.

    An ``ffn_width`` / ``attention_heads`` entry resizes a producer (e.g. ``intermediate.dense``, ``query``) that a
    ``low_rank`` entry may then factor, and config.json stores the map with sorted keys, so the order is fixed here
    rather than taken from the file. Layers that share a projection are linked once every entry is installed.
    """
    ordered = sorted(reductions.items(), key=lambda item: install_order(item[1].get("kind")))
    for path, entry in ordered:
        build_reduction(model, path, entry)
    for path, entry in ordered:
        link_shared_projection(model, path, entry)
