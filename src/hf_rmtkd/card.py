"""Model cards for RMT-KD compressed models, rendered from the packaged Jinja template (the pattern TRL uses).

The card's YAML metadata (``library_name``, ``base_model``, ``datasets``, ``tags``, ``pipeline_tag``, ``model-index``)
comes from `huggingface_hub.ModelCardData`; the body (summary, per-site table, spectrum plots, how to load, settings,
per-round log, citation) from ``templates/rmtkd_model_card.md``, a copy of ``model_cards/rmtkd_model_card.md``.

Example:
    >>> card = build_model_card(small, metric_before=0.912, metric_after=0.905, datasets=["rotten_tomatoes"],
    ...                         save_directory="out/")  # doctest: +SKIP
    >>> card.save("out/README.md")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .export import can_export_stock
from .modeling.modeling_rmtkd import RMTKDPreTrainedModel
from .plots import SUMMARY_NAME, site_file_name

__all__ = ["CARD_NAME", "LOG_NAME", "REPORT_NAME", "TEMPLATE_NAME", "build_model_card", "pipeline_tag_for",
           "template_text"]

TEMPLATE_NAME = "rmtkd_model_card.md"
# The files of a checkpoint folder besides those of `save_pretrained` (see `hf_rmtkd.checkpoint`).
REPORT_NAME = "rmtkd_report.json"
LOG_NAME = "rmtkd_log.json"
CARD_NAME = "README.md"
CARD_TAGS = ("hf_rmtkd", "rmt-kd", "compression")

# Class-name suffix -> Hub pipeline tag; the RMT-KD classes carry the suffix of the head they wrap.
PIPELINE_TAGS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForImageClassification", "image-classification"),
    ("ForMaskedLM", "fill-mask"),
    ("ForCausalLM", "text-generation"),
)

# Setting key (spectral report settings, trainer settings) -> label shown on the card. Unknown keys show as they are.
SETTING_LABELS = {
    "estimator": "σ² estimator",
    "spectrum_estimator": "σ² estimator",
    "quantile": "τ (quantile that starts the σ² fit)",
    "spectrum_quantile": "τ (quantile that starts the σ² fit)",
    "signal_fraction": "signal fraction kept per site (1: every outlier; lower when a parameter target needs it)",
    "target_search": "how a parameter target is reached",
    "head_signal_fraction": "signal fraction the kept attention heads hold (below the sites' own: fewer heads)",
    "edge": "edge (`tracy_widom`: λ₊ plus a finite-sample margin; `bare`: λ₊)",
    "spectrum_edge": "edge (`tracy_widom`: λ₊ plus a finite-sample margin; `bare`: λ₊)",
    "centre": "centring (mean subtracted before the eigen-decomposition)",
    "calibration_centre": "centring (mean subtracted before the eigen-decomposition)",
    "effective_samples": "effective samples n in q = d/n",
    "max_tokens": "calibration tokens per site (cap)",
    "calibration_max_tokens": "calibration tokens per site (cap)",
    "min_rank": "minimum rank / width",
    "ffn_method": "FFN width method",
    "ffn_width_method": "FFN width method",
    "distillation_alpha": "α (weight of the cross-entropy term)",
    "alpha": "α (weight of the cross-entropy term)",
    "distillation_temperature": "T (distillation temperature)",
    "temperature": "T (distillation temperature)",
    "distillation_mask_prob": "masked-copy distillation (share of tokens masked)",
    "distillation_copy_tokens": "what the copy's chosen tokens become ('neighbours': nearby words)",
    "distillation_mixup": "mixup distillation (c of the Beta(c, c) blend weights; 0: off)",
    "embedding_vocabulary": "tokens whose embedding codes are stored ('train': those of the training data)",
    "max_metric_drop": "largest metric drop accepted per round",
    "target_params": "parameter target",
    "min_keep_ratio": "smallest k/d cut",
}


def template_text() -> str:
    """The card template shipped inside the package (``hf_rmtkd/templates/rmtkd_model_card.md``)."""
    # importlib.resources rather than a path next to __file__: works from wheels, zips and editable installs alike.
    return resources.files("hf_rmtkd").joinpath("templates", TEMPLATE_NAME).read_text(encoding="utf-8")


def pipeline_tag_for(model) -> str:
    """The Hub ``pipeline_tag`` of a model, from the head its class wraps.

    Args:
        model: an RMT-KD (or any transformers) model.

    Returns:
        ``"text-classification"``, ``"token-classification"``, ``"image-classification"``, ``"fill-mask"``,
        ``"text-generation"``, or for a headless model ``"feature-extraction"`` / ``"image-feature-extraction"``.

    Example:
        >>> pipeline_tag_for(compressed_bert_classifier)  # doctest: +SKIP
        'text-classification'
    """
    name = type(model).__name__
    for suffix, tag in PIPELINE_TAGS:
        if name.endswith(suffix):
            return tag
    vision = getattr(model, "main_input_name", "input_ids") == "pixel_values"
    return "image-feature-extraction" if vision else "feature-extraction"


def build_model_card(
    model,
    *,
    report=None,
    rmtkd_log: list[dict] | None = None,
    base_model: str | None = None,
    datasets: list[str] | str | None = None,
    metric_name: str = "accuracy",
    metric_before: float | None = None,
    metric_after: float | None = None,
    params_before: int | None = None,
    speed_ratio: float | None = None,
    settings: dict[str, Any] | None = None,
    stock_export: str | None = None,
    image_dir: str = "spectra",
    save_directory: str | os.PathLike | None = None,
    model_id: str | None = None,
    model_name: str | None = None,
    eval_dataset: str | None = None,
    eval_split: str | None = None,
    speed_setup: str | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
) -> ModelCard:
    """Render the model card of an RMT-KD compressed model.

    Args:
        model: the compressed model (``hf_rmtkd.compress`` output, ``RMTKDTrainer.model``, or one loaded back).
        report: its `SpectralReport`; default ``model.rmtkd_report``; without one, the per-site table comes from the
            ``spectral_summary`` in the config.
        rmtkd_log: the trainer's per-round log (``RMTKDTrainer.rmtkd_log``), shown as a table when given.
        base_model: the Hub id of the model that was compressed; default the base config's ``_name_or_path`` when it
            looks like a Hub id (``owner/name``) and is not a local folder.
        datasets: Hub ids of the training / calibration data.
        metric_name: the name of the metric in ``metric_before`` / ``metric_after`` (e.g. ``"accuracy"``).
        metric_before, metric_after: the metric of the original and of the compressed model on the same eval set.
            Written to the ``model-index`` when a dataset is known (``eval_dataset`` or the first of ``datasets``).
        params_before: parameters of the original model; default: those of the base architecture in the config,
            counted on a meta-device skeleton (no memory).
        speed_ratio: measured time of the original divided by the time of the compressed model (>1: faster);
            ``None`` shows "not measured" (speed is never inferred from parameter counts).
        settings: extra settings to list beside the report's (e.g. α, T, ``max_metric_drop``).
        stock_export: Hub id or path of a plain base-architecture copy (see `hf_rmtkd.export.export_stock`);
            without one, the card says whether such an export is possible.
        image_dir: folder of the spectrum plots, relative to the card (links are relative too).
        save_directory: the checkpoint folder the card describes; the weights file size and the plots are looked
            up there. Without it the card shows neither.
        model_id: the Hub id or path users load the model from, used in the code snippets.
        model_name: the card's title and ``model-index`` name; default ``model_id``'s last part or
            ``<base model>-rmtkd``.
        eval_dataset, eval_split: the dataset (Hub id) and split the metric was measured on.
        speed_setup: how the speed was measured (batch size, sequence length, threads, hardware).
        tags: extra Hub tags (``hf_rmtkd``, ``rmt-kd``, ``compression`` and the model's own tags are always set).
        license, language: Hub metadata, passed through.

    Returns:
        A `huggingface_hub.ModelCard`; ``card.save(path)`` writes it, ``card.data`` holds the metadata.

    Raises:
        TypeError: ``model`` is not an RMT-KD model.

    Example:
        >>> small = hf_rmtkd.compress(model, calibration_set)  # doctest: +SKIP
        >>> small.save_pretrained("out/"); small.rmtkd_report.plot("out/spectra")  # doctest: +SKIP
        >>> build_model_card(small, save_directory="out/", metric_after=0.9).save("out/README.md")  # doctest: +SKIP
    """
    if not isinstance(model, RMTKDPreTrainedModel):
        raise TypeError(
            f"build_model_card describes an RMT-KD model (the output of hf_rmtkd.compress or RMTKDTrainer), got "
            f"{type(model).__name__}; compress it first."
        )
    report = report if report is not None else getattr(model, "rmtkd_report", None)
    directory = Path(save_directory) if save_directory is not None else None
    base_model = base_model or _hub_id(model.config.base_config.get("_name_or_path"))
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or [])
    eval_dataset = eval_dataset or (datasets[0] if datasets else None)
    model_name = model_name or (model_id.rstrip("/").rpartition("/")[2] if model_id else None)
    model_name = model_name or f"{(base_model or model.config.base_config['model_type']).rpartition('/')[2]}-rmtkd"
    pipeline_tag = pipeline_tag_for(model)

    eval_results = []
    if eval_dataset is not None:
        # Both values go under one (task, dataset) result, told apart by their display names.
        for value, label in ((metric_after, metric_name), (metric_before, f"{metric_name} (before RMT-KD)")):
            if value is not None:
                eval_results.append(EvalResult(
                    task_type=pipeline_tag, dataset_type=eval_dataset, dataset_name=eval_dataset,
                    dataset_split=eval_split, metric_type=metric_name, metric_value=float(value), metric_name=label,
                ))
    card_data = ModelCardData(
        base_model=base_model,
        datasets=datasets or None,
        eval_results=eval_results or None,
        language=language,
        library_name="transformers",
        license=license,
        metrics=[metric_name] if eval_results else None,
        model_name=model_name,
        pipeline_tag=pipeline_tag,
        tags=_unique([*CARD_TAGS, *(getattr(model, "model_tags", None) or []), *(tags or [])]),
    )

    params_after = model.num_parameters()
    params_before = params_before if params_before is not None else _base_parameters(model)
    auto_class = type(model).base_auto_class.__name__
    stock_class = type(model.model).__name__
    kinds = {path: entry.get("kind") for path, entry in (getattr(model.config, "reductions", None) or {}).items()}
    return ModelCard.from_template(
        card_data,
        template_str=template_text(),
        model_name=model_name,
        base_model=base_model,
        datasets=datasets,
        params_before=f"{params_before:,}",
        params_after=f"{params_after:,}",
        params_change=_percent(params_after, params_before),
        file_size=_weights_size(directory),
        speed=_speed(speed_ratio),
        speed_setup=speed_setup,
        metric_name=metric_name,
        metric_before=_number(metric_before, missing="not measured"),
        metric_after=_number(metric_after, missing="not measured"),
        metric_change=_difference(metric_after, metric_before),
        sites=_site_rows(model, report, rmtkd_log),
        stream=_stream_widths(model),
        folded_norms=sum(kind == "folded_batchnorm" for kind in kinds.values()),
        folded_embeddings=[path for path, kind in kinds.items() if kind == "folded_embeddings"],
        report_file=_listed(directory, REPORT_NAME, report is not None),
        log_file=_listed(directory, LOG_NAME, bool(rmtkd_log)),
        images=_images(directory, image_dir, report),
        image_dir=image_dir,
        auto_class=auto_class,
        model_ref=model_id or "path/to/this/model",
        stock_export=stock_export,
        stock_exportable=stock_export is None and can_export_stock(model),
        stock_class=stock_class,
        settings=_settings_rows(report, model, settings),
        rounds=_round_rows(rmtkd_log),
        log_metric=_log_metric(rmtkd_log) or metric_name,
        versions=_versions(),
    )


def _hub_id(name: str | None) -> str | None:
    """``name`` if it looks like a Hub repo id (``owner/name``) and is not a local folder, else None."""
    if name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.exists(name):
        return name
    return None


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _stream_widths(model) -> str | None:
    """What the ``residual`` kind kept of the residual stream, else None: "between every two LayerNorms,
    d → k_min–k_max directions ... in each of its N segments", or for a ResNet the channels each stream kept."""
    reductions = getattr(model.config, "reductions", None) or {}
    channels = [reductions[path]["width"] for path in sorted(reductions)
                if reductions[path].get("kind") == "residual_channels"]
    if channels:
        return f"whole channels kept in {len(channels)} streams, in depth order: {', '.join(map(str, channels))}"
    kept = sorted(e["width"] - 1 for e in reductions.values() if e.get("kind") == "residual" and e.get("width"))
    if not kept:
        return None
    d = getattr(model.config, "hidden_size", None)
    span = f"{kept[0]}" if kept[0] == kept[-1] else f"{kept[0]}–{kept[-1]}"
    return (f"between every two LayerNorms, {d} → {span} directions (plus the per-token mean) in each of its "
            f"{len(kept)} segments")


def _base_parameters(model: RMTKDPreTrainedModel) -> int:
    """Parameters of the uncompressed base architecture, counted on the meta device (no memory, no init)."""
    config = model.config.base_model_config()
    # The wrapper's config carries the wrapper's attention implementation (sdpa), which e.g. ResNet rejects: build
    # the skeleton with the one the in-memory base model actually uses.
    config._attn_implementation = getattr(model.model.config, "_attn_implementation", None)
    with torch.device("meta"):
        skeleton = type(model).base_auto_class.from_config(config)
    return skeleton.num_parameters()


def _percent(after: int, before: int) -> str:
    return f"{(after - before) / before:+.1%}" if before else "—"


def _speed(ratio: float | None) -> str:
    if ratio is None:
        return "not measured"
    return f"{ratio:.2f}× faster (measured)" if ratio >= 1 else f"{1 / ratio:.2f}× slower (measured)"


def _number(value: float | None, missing: str = "—") -> str:
    return missing if value is None else f"{value:.4g}"


def _difference(after: float | None, before: float | None) -> str:
    return "—" if after is None or before is None else f"{after - before:+.4g}"


def _file_size(size: int) -> str:
    """Bytes in decimal units, as the Hub shows them."""
    exponent = min(int(math.log10(size)) // 3, 3) if size > 0 else 0
    if exponent == 0:
        return f"{size:,} bytes"
    return f"{size / 1000**exponent:.1f} {('kB', 'MB', 'GB')[exponent - 1]}"


def _weights_size(directory: Path | None) -> str:
    """The size of ``model.safetensors`` (or of all its shards) in ``directory``; ``"—"`` when there is none."""
    if directory is None:
        return "—"
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return _file_size(single.stat().st_size)
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        return f"{_file_size(sum((directory / s).stat().st_size for s in shards))} in {len(shards)} shards"
    return "—"


def _cuts_by_site(model) -> dict[str, tuple[str, int]]:
    """``{site: (kind, installed rank or width)}`` from the plan when the model carries one, else the config's map.

    The reduction map is keyed by module path; a site's own path is one of its modules for every kind (the FFN's
    down projection, the first of the layers sharing an input, the embedding), so a lookup by site name finds it.
    """
    reductions = model.config.reductions
    cuts = {path: (entry["kind"], entry.get("rank", entry.get("width"))) for path, entry in reductions.items()}
    plan = getattr(model, "rmtkd_plan", None)
    if plan is not None:
        cuts.update({cut.site: (cut.kind, cut.rank) for cut in plan.cuts})
    return cuts


def _site_rows(model, report, rmtkd_log: list[dict] | None = None) -> list[dict[str, str]]:
    """One row per analysed site: from the report, else from the config's ``spectral_summary``.

    The spectrum columns are the latest measurement. The width column is the site's width before its cut, the width
    installed and, when they differ, the outlier count of the measurement that cut it: from the round log for a site
    cut in an earlier round (the latest report measured it already narrowed).
    """
    cut_in_round = {}
    for entry in rmtkd_log or []:
        if entry.get("accepted"):
            for site, info in entry.get("sites", {}).items():
                cut_in_round.setdefault(site, info)
    if report is not None:
        sites = [(s.name, s.role, s.d, s.k, s.outliers.sigma2, s.outliers.lambda_plus, s.outliers.retained_variance)
                 for s in report.sites]
    else:
        summary = (model.config.spectral_summary or {}).get("sites", {})
        sites = [(name, s["role"], s["d"], s["k"], s["sigma2"], s["lambda_plus"], s["retained_variance"])
                 for name, s in summary.items()]
    cuts = _cuts_by_site(model)
    rows = []
    for name, role, d, k, sigma2, lambda_plus, retained in sites:
        kind, rank = cuts.get(name, ("not cut", d))
        if name in cut_in_round:
            d, k = cut_in_round[name]["d"], cut_in_round[name]["k_spectrum"]
        cut = f"{d} → {rank}" + (f" (spectrum: {k})" if rank != k and name in cuts else "")
        rows.append({"name": name, "role": role, "kind": kind, "cut": cut, "sigma2": f"{sigma2:.4g}",
                     "lambda_plus": f"{lambda_plus:.4g}", "retained": f"{retained:.1%}"})
    return rows


def _listed(directory: Path | None, name: str, expected: bool) -> bool:
    """Whether the card lists file ``name``: it exists in ``directory``, or, with no folder known, is ``expected``."""
    return (directory / name).is_file() if directory is not None else expected


def _images(directory: Path | None, image_dir: str, report) -> list[dict[str, str]]:
    """Relative links to the plots that exist: the summary, the sites in report order, then any other PNG."""
    folder = directory / image_dir if directory is not None else None
    if folder is None or not folder.is_dir():
        return []
    present = {p.stem for p in folder.glob("*.png")}
    names = [n for n in (report.names if report is not None else []) if site_file_name(n) in present]
    stems = _unique([SUMMARY_NAME, *(site_file_name(n) for n in names), *sorted(present)])
    alt = {site_file_name(n): n for n in names} | {SUMMARY_NAME: "k/d and retained variance per layer"}
    return [{"path": f"{image_dir}/{stem}.png", "alt": alt.get(stem, stem)} for stem in stems if stem in present]


def _settings_rows(report, model, settings: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(label, value) pairs: the analysis settings (report, else the config's summary), then ``settings``."""
    merged = dict(report.settings if report is not None else (model.config.spectral_summary or {}).get("settings", {}))
    merged.update(settings or {})
    return [(SETTING_LABELS.get(key, f"`{key}`"), _setting_value(value)) for key, value in merged.items()]


def _setting_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    if isinstance(value, str):
        return f"`{value}`"
    return str(value)


def _log_metric(rmtkd_log: list[dict] | None) -> str | None:
    """The metric the trainer guarded, read from its ``<metric>_after_cut`` key."""
    for entry in rmtkd_log or []:
        for key in entry:
            if key.endswith("_after_cut") and key != "params_after_cut":
                return key.removesuffix("_after_cut")
    return None


def _round_rows(rmtkd_log: list[dict] | None) -> list[dict[str, str]]:
    """One row per round of ``RMTKDTrainer.rmtkd_log``."""
    metric = _log_metric(rmtkd_log)
    rows = []
    for entry in rmtkd_log or []:
        sites = entry.get("sites", {})
        kinds: dict[str, int] = {}
        for site in sites.values():
            kinds[site.get("kind", "?")] = kinds.get(site.get("kind", "?"), 0) + 1
        before, after = entry.get("params_before"), entry.get("params")
        rows.append({
            "round": entry.get("round", len(rows) + 1),
            "sites": f"{len(sites)} ({', '.join(f'{kind} ×{n}' for kind, n in kinds.items())})" if sites else "0",
            "params": f"{before:,} → {after:,}" if before is not None and after is not None else "—",
            "after_cut": _number(entry.get(f"{metric}_after_cut")) if metric else "—",
            "metric": _number(entry.get(metric)) if metric else "—",
            "drop": _number(entry.get("metric_drop")),
            "accepted": "yes" if entry.get("accepted") else "no (rolled back)",
        })
    return rows


def _versions() -> list[tuple[str, str]]:
    import huggingface_hub
    import transformers

    from . import __version__

    return [("hf_rmtkd", __version__), ("transformers", transformers.__version__), ("torch", torch.__version__),
            ("huggingface_hub", huggingface_hub.__version__)]
