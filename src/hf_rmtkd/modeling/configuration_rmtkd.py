"""Configuration of an RMT-KD compressed model: the base model's config plus the map of reduced modules.

This file is copied flat into every saved checkpoint, so it imports only transformers and the standard library.
"""

import copy

from transformers import AutoConfig, PreTrainedConfig

# Bump when the meaning of `reductions` changes; older code must refuse newer checkpoints instead of misreading them.
# 2: low_rank entries may share one projection ("shares_projection_with"), which version-1 code would misread.
# 3: embedding entries may store codes for fewer tokens than the vocabulary ("rows", with a token -> row table).
# 4: "residual" entries narrow the residual stream between post-LayerNorms (ReducedLayerNorm).
# 5: "folded_batchnorm" entries: a BatchNorm2d folded into the convolution before it (nn.Identity + a conv bias).
# 6: "residual_channels" entries: a ResNet's residual stream keeps fewer whole channels (writers and readers resized).
# 7: "folded_embeddings" entries: BERT's embeddings written straight into a narrowed stream (FoldedEmbeddings).
FORMAT_VERSION = 7

# Base-config fields copied to the top level, for code that reads them from `model.config` without knowing about
# the wrapper: pipelines (labels), generation (special tokens), tooling that sizes things by `hidden_size`.
MIRRORED_FIELDS = (
    "id2label",
    "label2id",
    "problem_type",
    "vocab_size",
    "hidden_size",
    "tie_word_embeddings",
    "is_encoder_decoder",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "dtype",
)


class RMTKDConfig(PreTrainedConfig):
    """Config of an RMT-KD compressed model.

    Args:
        base_config: the base model's full config, as ``PreTrainedConfig.to_dict()`` (must contain ``model_type``);
            a ``PreTrainedConfig`` is accepted too.
        reductions: the reduction map ``{module path relative to the base model: entry}``, where an entry is
            ``{"kind": "low_rank", "rank": k}``, ``{"kind": "ffn_width", "width": k, "producers": [paths]}`` or
            ``{"kind": "embedding", "rank": k}`` (every kind: ``modeling/layers_rmtkd.py``).
        spectral_summary: JSON-able per-site summary of the spectra that decided the cuts (d, n, sigma2,
            lambda_plus, k, retained_variance, ...). Informational only.
        format_version: version of this layout; a checkpoint newer than this code is refused.
        kwargs: the usual ``PreTrainedConfig`` arguments. Labels, special tokens and a few sizes default to the
            base config's so pipelines and generation see them at the top level.
    """

    model_type = "rmtkd"

    def __init__(
        self, base_config=None, reductions=None, spectral_summary=None, format_version=FORMAT_VERSION, **kwargs
    ):
        if not isinstance(format_version, int) or format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses RMT-KD format_version={format_version!r}, but the installed code reads up to "
                f"format_version={FORMAT_VERSION}. Upgrade hf_rmtkd (or the checkpoint's modeling code)."
            )
        if isinstance(base_config, PreTrainedConfig):
            base_config = base_config.to_dict()
        base_config = copy.deepcopy(dict(base_config or {}))
        if base_config and "model_type" not in base_config:
            raise ValueError("RMTKDConfig: `base_config` must contain the base model's `model_type`.")
        self.base_config = base_config
        self.reductions = copy.deepcopy(dict(reductions or {}))
        self.spectral_summary = copy.deepcopy(spectral_summary or {})
        self.format_version = format_version
        for name in MIRRORED_FIELDS:
            if name in base_config and name not in kwargs:
                kwargs[name] = base_config[name]
        super().__init__(**kwargs)

    def base_model_config(self) -> PreTrainedConfig:
        """Rebuild the base model's config (the architecture before any reduction).

        Labels, ``problem_type`` and ``dtype`` come from this config, which is the one users and pipelines edit; the
        attention implementation is passed on only when one was requested.

        Returns:
            A new config of the base model's class (e.g. ``BertConfig``).
        """
        if not self.base_config:
            raise ValueError("RMTKDConfig has no `base_config`; build it with `base_config=model.config.to_dict()`.")
        fields = copy.deepcopy(self.base_config)
        model_type = fields.pop("model_type")
        for name in ("id2label", "label2id", "problem_type", "dtype"):
            fields[name] = getattr(self, name)
        config = AutoConfig.for_model(model_type, **fields)
        if (attn_implementation := getattr(self, "_attn_implementation", None)) is not None:
            config._attn_implementation = attn_implementation
        return config


# `save_pretrained` copies this file into the checkpoint and records it under `auto_map["AutoConfig"]`.
RMTKDConfig.register_for_auto_class()
