"""Model classes of an RMT-KD compressed checkpoint: the base architecture with some modules replaced by smaller ones.

Each class builds the base model from ``config.base_model_config()`` with the matching transformers Auto class, stores
it as ``self.model``, installs the reduced modules named by ``config.reductions`` (shapes only: transformers 5.x
builds on the meta device and loads the weights afterwards) and delegates ``forward`` to it. State-dict keys are the
base model's keys with a ``model.`` prefix.

This file is copied flat into every saved checkpoint, together with ``configuration_rmtkd.py`` and
``layers_rmtkd.py``, so it imports only torch, transformers, the standard library and those two files.
"""

import copy

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.models.auto import modeling_auto

from .configuration_rmtkd import RMTKDConfig
from .layers_rmtkd import ModulePathError, apply_reduction_map


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors are missing, unexpected or misshaped for its RMT-KD config."""


class RMTKDPreTrainedModel(PreTrainedModel):
    """Base of the RMT-KD model classes: builds ``self.model`` (the reduced base model) from an :class:`RMTKDConfig`.

    Subclasses set ``base_auto_class`` (the transformers Auto class that builds the base model and under which the
    subclass registers) and ``base_mapping_names`` (that Auto class's ``model_type -> class name`` table).
    """

    config_class = RMTKDConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # The wrapper has no attention of its own: accept every implementation and let the base model check the request.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    base_auto_class = AutoModel
    base_mapping_names = modeling_auto.MODEL_MAPPING_NAMES

    def __init__(self, config: RMTKDConfig):
        # Read the base config before PreTrainedModel.__init__ fills in a default attention implementation, so only an
        # explicit request reaches the base model.
        base_config = config.base_model_config()
        super().__init__(config)
        self.model = self.base_auto_class.from_config(base_config)
        try:
            apply_reduction_map(self.model, config.reductions)
        except ModulePathError as err:
            saved_as = config.architectures or []
            if saved_as and type(self).__name__ not in saved_as:
                # Map paths are relative to the model that was compressed, e.g. a head model's `bert.` prefix.
                raise ModulePathError(
                    f"{err} This checkpoint was saved as {', '.join(saved_as)}: load it with the Auto class of that "
                    f"head, not {self.base_auto_class.__name__}."
                ) from None
            raise
        self.main_input_name = self.model.main_input_name
        self.post_init()

    @classmethod
    def from_base(cls, base_model: PreTrainedModel, reductions: dict, spectral_summary: dict | None = None):
        """Wrap an in-memory base model whose modules were already reduced, without copying its weights.

        Args:
            base_model: e.g. a ``BertForSequenceClassification`` after the surgery of every entry in ``reductions``.
            reductions: the reduction map describing that surgery (module paths relative to ``base_model``).
            spectral_summary: optional JSON-able summary stored in the config.

        Returns:
            An instance of ``cls`` whose ``.model`` is ``base_model`` itself (parameters are shared, not copied).
        """
        config = RMTKDConfig(
            base_config=base_model.config.to_dict(), reductions=reductions, spectral_summary=spectral_summary
        )
        # Build the skeleton on the meta device (no memory, no init), check it against the model, then swap it in.
        with torch.device("meta"):
            wrapper = cls(config)
        if type(wrapper.model) is not type(base_model):
            raise ValueError(
                f"{cls.__name__} wraps a {type(wrapper.model).__name__} for model_type "
                f"'{config.base_config['model_type']}', got a {type(base_model).__name__}; use rmtkd_class_for(model)."
            )
        expected = {name: tuple(t.shape) for name, t in wrapper.model.state_dict().items()}
        actual = {name: tuple(t.shape) for name, t in base_model.state_dict().items()}
        for name in sorted(expected.keys() | actual.keys()):
            if expected.get(name) != actual.get(name):
                raise ValueError(
                    f"Tensor '{name}' of the base model has shape {actual.get(name)}, but the reduction map implies "
                    f"{expected.get(name)} (None = absent): apply every reduction in the map, and only those."
                )
        wrapper.model = base_model
        if wrapper.can_generate() and getattr(base_model, "generation_config", None) is not None:
            wrapper.generation_config = copy.deepcopy(base_model.generation_config)
        return wrapper.train(base_model.training)

    @classmethod
    def from_pretrained(cls, *args, strict: bool = True, **kwargs):
        """``PreTrainedModel.from_pretrained``, but weights that do not match the config are an error.

        transformers re-initialises missing or mismatched tensors (with a warning) and drops unexpected ones; for a
        reduced model any of these means the config and the weights come from different cuts, or the file is damaged,
        so we raise `CheckpointMismatchError` naming the tensors. ``strict=False`` (or ``ignore_mismatched_sizes=True``
        for shapes) restores transformers' lenient behaviour.
        """
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                *args, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
            )
        except Exception as err:
            # safetensors reports a truncated file as "incomplete metadata"; say which checkpoint is damaged.
            if type(err).__name__ == "SafetensorError":
                where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
                raise CheckpointMismatchError(
                    f"The weights of '{where}' cannot be read ({err}): the safetensors file is truncated or damaged."
                ) from err
            raise
        problems = []
        if info["mismatched_keys"] and not ignore_mismatched_sizes:
            problems.append("shapes differ from what the config's reductions imply: " + "; ".join(
                f"'{name}' checkpoint {tuple(ckpt)} vs config {tuple(expected)}"
                for name, ckpt, expected in sorted(info["mismatched_keys"])
            ))
        if strict and info["missing_keys"]:
            problems.append(f"missing tensors: {sorted(info['missing_keys'])}")
        if strict and info["unexpected_keys"]:
            problems.append(f"unexpected tensors: {sorted(info['unexpected_keys'])}")
        if problems:
            raise CheckpointMismatchError(
                f"The checkpoint's weights do not match its RMT-KD config ({'; '.join(problems)}). The weights and "
                "config.json do not belong together, or the weights file is damaged."
            )
        return (model, info) if output_loading_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained`` that writes an ``auto_map`` entry for every Auto class this base fits.

        transformers only records the Auto class of the object being saved; we list all of them so that, without the
        plugin, ``AutoModel`` as well as the head class load the checkpoint with ``trust_remote_code=True``.
        """
        self.config.auto_map = auto_map_for(self.config.base_config["model_type"])
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.model.set_output_embeddings(new_embeddings)

    def resize_token_embeddings(self, *args, **kwargs):
        """Resize the base model's token embeddings and record the new vocabulary size in both configs."""
        embeddings = self.model.resize_token_embeddings(*args, **kwargs)
        self.config.base_config["vocab_size"] = self.model.config.vocab_size
        self.config.vocab_size = self.model.config.vocab_size
        return embeddings

    def _forward_base(self, **inputs):
        # Pass only what the caller gave: bases differ in which inputs they accept (no token_type_ids on LLaMA).
        return self.model(**{name: value for name, value in inputs.items() if value is not None})


class RMTKDModel(RMTKDPreTrainedModel):
    """A reduced bare base model (``AutoModel``: ``BertModel``, ``ViTModel``, ``LlamaModel``, ...)."""

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        pixel_values=None,
        **kwargs,
    ):
        return self._forward_base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            **kwargs,
        )


class _RMTKDTextHead(RMTKDPreTrainedModel):
    """Shared forward of the text heads; ``labels`` is in the signature so Trainer finds the label column."""

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        **kwargs,
    ):
        return self._forward_base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            **kwargs,
        )


class RMTKDForSequenceClassification(_RMTKDTextHead):
    """A reduced ``AutoModelForSequenceClassification`` model."""

    base_auto_class = AutoModelForSequenceClassification
    base_mapping_names = modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES


class RMTKDForTokenClassification(_RMTKDTextHead):
    """A reduced ``AutoModelForTokenClassification`` model."""

    base_auto_class = AutoModelForTokenClassification
    base_mapping_names = modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES


class RMTKDForMaskedLM(_RMTKDTextHead):
    """A reduced ``AutoModelForMaskedLM`` model."""

    base_auto_class = AutoModelForMaskedLM
    base_mapping_names = modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES


class RMTKDForImageClassification(RMTKDPreTrainedModel):
    """A reduced ``AutoModelForImageClassification`` model."""

    base_auto_class = AutoModelForImageClassification
    base_mapping_names = modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    def forward(self, pixel_values=None, labels=None, **kwargs):
        return self._forward_base(pixel_values=pixel_values, labels=labels, **kwargs)


class RMTKDForCausalLM(RMTKDPreTrainedModel, GenerationMixin):
    """A reduced ``AutoModelForCausalLM`` model; ``generate`` runs the base model's own generation loop."""

    base_auto_class = AutoModelForCausalLM
    base_mapping_names = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        **kwargs,
    ):
        return self._forward_base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )

    def generate(self, *args, **kwargs):
        """Generate with the base model (its KV cache and config logic), using this model's generation config.

        The base model knows its cache layout (layers, heads, sliding windows); the wrapper's config does not, so the
        loop runs there. ``self.generation_config`` (the one saved with the checkpoint) is the one in force: it is
        handed to the base model rather than passed as an argument, so callers may still pass generation kwargs.
        """
        self.model.generation_config = self.generation_config
        return self.model.generate(*args, **kwargs)


RMTKD_CLASSES = (
    RMTKDModel,
    RMTKDForSequenceClassification,
    RMTKDForTokenClassification,
    RMTKDForMaskedLM,
    RMTKDForImageClassification,
    RMTKDForCausalLM,
)

# `save_pretrained` copies this file (and its relative imports) into the checkpoint only for classes registered here.
for _cls in RMTKD_CLASSES:
    _cls.register_for_auto_class(_cls.base_auto_class.__name__)


def _class_names(names) -> tuple:
    return tuple(names) if isinstance(names, (list, tuple)) else (names,)


def auto_map_for(model_type: str) -> dict:
    """The ``auto_map`` of a checkpoint whose base has ``model_type``: AutoConfig plus every Auto class that fits.

    Args:
        model_type: the base model's ``model_type`` (e.g. ``"bert"``).

    Returns:
        ``{"AutoConfig": "configuration_rmtkd.RMTKDConfig", "AutoModel": "modeling_rmtkd.RMTKDModel", ...}``.
    """
    auto_map = {"AutoConfig": f"{RMTKDConfig.__module__.rpartition('.')[2]}.{RMTKDConfig.__name__}"}
    for cls in RMTKD_CLASSES:
        if model_type in cls.base_mapping_names:
            auto_map[cls.base_auto_class.__name__] = f"{cls.__module__.rpartition('.')[2]}.{cls.__name__}"
    return auto_map


def rmtkd_class_for(base_model: PreTrainedModel) -> type:
    """The RMT-KD class that wraps a given base model, found through transformers' Auto class tables.

    Args:
        base_model: a transformers model, e.g. ``BertForSequenceClassification`` or ``LlamaForCausalLM``.

    Returns:
        The matching class, e.g. :class:`RMTKDForSequenceClassification`.
    """
    model_type, name = base_model.config.model_type, type(base_model).__name__
    for cls in RMTKD_CLASSES:
        if name in _class_names(cls.base_mapping_names.get(model_type, ())):
            return cls
    raise ValueError(
        f"No RMT-KD model class wraps {name} (model_type '{model_type}'): supported are the classes that "
        f"{', '.join(cls.base_auto_class.__name__ for cls in RMTKD_CLASSES)} build for that model_type."
    )


def register_auto_classes() -> None:
    """Register :class:`RMTKDConfig` and the model classes with transformers' Auto classes (idempotent)."""
    AutoConfig.register(RMTKDConfig.model_type, RMTKDConfig, exist_ok=True)
    for cls in RMTKD_CLASSES:
        cls.base_auto_class.register(RMTKDConfig, cls, exist_ok=True)
