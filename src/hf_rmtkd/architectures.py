"""Where RMT-KD measures and cuts, per architecture: a table of roles, not code paths.

A *site* is a tensor the model computes whose covariance we measure: the input of a Linear (or of a group of Linears
that read the same tensor, like q/k/v), an FFN's inner activation (the input of its down-projection), a bottleneck's
inner channels, or the token-embedding output. Each architecture lists its repeated block and, inside the block, the
sites by role; any other model is reached through ``targets=`` patterns over its ``nn.Linear`` layers.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    >>> [s.name for s in find_sites(model, ["ffn_inner"])]
    ['encoder.layer.0.output.dense', 'encoder.layer.1.output.dense']
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from torch import nn

__all__ = [
    "ARCHITECTURES", "ArchitectureRoles", "Site", "SiteTemplate", "attention_head_dim", "find_sites", "site_roles",
]


@dataclass(frozen=True)
class SiteTemplate:
    """One site inside a repeated block; every path is relative to the block.

    Attributes:
        role: what the tensor is (``attention_in``, ``attention_out``, ``ffn_in``, ``ffn_inner``, ``conv_inner``).
        hook: the module whose INPUT is captured (the first consumer).
        consumers: the layers that read the tensor (``low_rank`` candidates; they may share one projection).
        producers: for inner widths, the modules whose output width is the tensor's width (``ffn_width``); for an
            attention output whose heads may be dropped, q/k/v (``attention_heads``).
    """

    role: str
    hook: str
    consumers: tuple[str, ...]
    producers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchitectureRoles:
    """The sites of one architecture: its repeated block and the embedding layers."""

    block: str  # regex that matches the full path of every repeated block
    sites: tuple[SiteTemplate, ...]
    embeddings: tuple[str, ...] = ()  # regexes matching token-embedding module paths


def _transformer(prefix_q, q, k, v, attn_out, ffn_up, ffn_down, ffn_producers=None, block=r"encoder\.layer\.\d+",
                 embeddings=(r"embeddings\.word_embeddings",), heads_from_width=False) -> ArchitectureRoles:
    """The sites of a transformer block. ``heads_from_width``: the attention reshapes q/k/v into heads of a fixed size
    and infers their count from the width (BERT's ``view(..., -1, head_size)``), so whole heads may be dropped."""
    join = lambda name: f"{prefix_q}.{name}" if prefix_q else name  # noqa: E731
    up = ffn_up if isinstance(ffn_up, tuple) else (ffn_up,)
    qkv = (join(q), join(k), join(v))
    return ArchitectureRoles(
        block=block,
        sites=(
            SiteTemplate("attention_in", join(q), qkv),
            SiteTemplate("attention_out", attn_out, (attn_out,), qkv if heads_from_width else ()),
            SiteTemplate("ffn_in", up[0], up),
            SiteTemplate("ffn_inner", ffn_down, (ffn_down,), ffn_producers or up),
        ),
        embeddings=embeddings,
    )


_BERT = _transformer("attention.self", "query", "key", "value", "attention.output.dense", "intermediate.dense",
                     "output.dense", heads_from_width=True)
_LLAMA = _transformer("self_attn", "q_proj", "k_proj", "v_proj", "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"),
                      "mlp.down_proj", block=r"layers\.\d+", embeddings=(r"embed_tokens",))

# The inner widths of a transformers ResNet block (`ResNetBottleNeckLayer` has three conv layers, `ResNetBasicLayer`
# two); a block's output channels feed the residual sum, so only the inner ones are cut.
_RESNET = ArchitectureRoles(
    block=r"encoder\.stages\.\d+\.layers\.\d+",
    sites=(
        SiteTemplate("conv_inner", "layer.1.convolution", ("layer.1.convolution",),
                     ("layer.0.convolution", "layer.0.normalization")),
        SiteTemplate("conv_inner", "layer.2.convolution", ("layer.2.convolution",),
                     ("layer.1.convolution", "layer.1.normalization")),
    ),
)

ARCHITECTURES: dict[str, ArchitectureRoles] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "camembert": _BERT,
    "electra": _BERT,
    "distilbert": _transformer("attention", "q_lin", "k_lin", "v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2",
                               block=r"transformer\.layer\.\d+"),
    # transformers 5.x ViT names its blocks `vit.layers.N` with `attention.{q,k,v,o}_proj` and `mlp.fc1/fc2`.
    "vit": _transformer("attention", "q_proj", "k_proj", "v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2",
                        block=r"layers\.\d+", embeddings=()),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "resnet": _RESNET,
}

ROLES = ("embedding", "attention_in", "attention_out", "ffn_in", "ffn_inner", "conv_inner", "linear")
_CUTTABLE = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Site:
    """A measured tensor: what to hook, and which layers a cut there would touch.

    Attributes:
        name: unique name, the path of the hooked module (relative to the base model).
        hook: module path whose input (``capture="input"``) or output (``"output"``) is the tensor.
        capture: ``"input"`` or ``"output"``.
        role: one of `ROLES`.
        layer: block index (depth order); -1 for embeddings.
        consumers: layers reading the tensor.
        producers: modules producing an inner width (for ``ffn_width``).
        channel_dim: the feature axis of the captured tensor (1 for NCHW convolutions, -1 otherwise).
    """

    name: str
    hook: str
    capture: str
    role: str
    layer: int
    consumers: tuple[str, ...] = ()
    producers: tuple[str, ...] = ()
    channel_dim: int = -1


def unique_module_path(model: nn.Module, suffix: str) -> str | None:
    """The path of the one module of ``model`` named ``suffix`` or ending in ``.suffix``; None if none or several."""
    matches = [name for name, _ in model.named_modules() if name == suffix or name.endswith(f".{suffix}")]
    return matches[0] if len(matches) == 1 else None


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2 style `Conv1D` is a Linear with a transposed weight; matched by name to avoid importing its module.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _table_sites(model: nn.Module, roles: ArchitectureRoles) -> list[Site]:
    modules = dict(model.named_modules())
    block_re = re.compile(rf"(?:^|.*\.){roles.block}$")
    blocks = [path for path in modules if block_re.match(path)]
    sites = []
    for path in modules:
        if any(re.fullmatch(rf"(?:.*\.)?{pattern}", path) for pattern in roles.embeddings):
            if isinstance(modules[path], nn.Embedding):
                sites.append(Site(path, path, "output", "embedding", -1))
    for layer, block in enumerate(blocks):
        for template in roles.sites:
            hook = f"{block}.{template.hook}"
            hooked = modules.get(hook)
            consumers = tuple(f"{block}.{c}" for c in template.consumers)
            # A site whose layers were already replaced (e.g. by a low-rank module) is no longer a site.
            if not isinstance(hooked, _CUTTABLE) or not all(isinstance(modules.get(c), _CUTTABLE) for c in consumers):
                continue
            sites.append(Site(
                name=hook, hook=hook, capture="input", role=template.role, layer=layer, consumers=consumers,
                producers=tuple(f"{block}.{p}" for p in template.producers),
                channel_dim=1 if isinstance(hooked, nn.Conv2d) else -1,
            ))
    return sites


def _linear_sites(model: nn.Module) -> list[Site]:
    """Every Linear (and GPT-2 Conv1D) input as its own site: the fallback for architectures not in the table."""
    sites = []
    for index, (path, module) in enumerate(model.named_modules()):
        if isinstance(module, nn.Linear) or _is_conv1d(module):
            sites.append(Site(path, path, "input", "linear", index, consumers=(path,)))
    return sites


def _matches(site: Site, pattern: str) -> bool:
    if pattern == site.role:
        return True
    return fnmatch.fnmatchcase(site.name, pattern) or re.fullmatch(pattern, site.name) is not None


def find_sites(model: nn.Module, targets: list[str] | str | None = None) -> list[Site]:
    """List the sites of ``model``, shallow to deep, optionally filtered by ``targets``.

    Args:
        model: a transformers model (or any ``nn.Module``; architectures outside `ARCHITECTURES` are reached through
            their ``nn.Linear`` inputs).
        targets: role names (``"ffn_inner"``), glob patterns (``"*.output.dense"``) or regexes over site names. Every
            target must match at least one site.

    Returns:
        The sites, in depth order (embeddings first).

    Raises:
        ValueError: when no site can be found, or a target matches nothing (the message lists what exists).
    """
    if isinstance(targets, str):
        targets = [targets]
    roles = site_roles(model)
    sites = _table_sites(model, roles) if roles is not None else []
    if roles is None or targets:
        # Linears outside the table: all of them for an unknown architecture, else only those a target names.
        covered = {consumer for site in sites for consumer in site.consumers}
        extra = [s for s in _linear_sites(model) if s.name not in covered]
        sites += extra if roles is None else [s for s in extra if any(_matches(s, t) for t in targets)]
    if targets:
        for target in targets:
            if not target or not any(_matches(s, target) for s in sites):
                sample = ", ".join(s.name for s in sites[:6]) or "none"
                raise ValueError(
                    f"Target {target!r} matches no site of {type(model).__name__}. Targets are roles {ROLES}, glob "
                    f"patterns or regexes over site names (e.g. {sample}, ...)."
                )
        sites = [s for s in sites if any(_matches(s, t) for t in targets)]
    if not sites:
        raise ValueError(
            f"{type(model).__name__} has no site RMT-KD can analyse: no nn.Linear, Conv2d or token embedding "
            f"was found (model_type {_model_type(model)!r}). Pass targets= patterns naming its linear layers."
        )
    order = {name: i for i, name in enumerate(dict(model.named_modules()))}
    return sorted(sites, key=lambda s: (s.layer, order.get(s.hook, 0)))


def site_roles(model: nn.Module) -> ArchitectureRoles | None:
    """The role table for ``model``'s architecture, or None when it is reached through ``targets=`` only."""
    return ARCHITECTURES.get(_model_type(model) or "")


def attention_head_dim(model: nn.Module) -> int | None:
    """The features of one attention head (``hidden_size / num_attention_heads``); None when the config lacks them."""
    config = getattr(model, "config", None)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads < 1 or hidden % heads:
        return None
    return hidden // heads
