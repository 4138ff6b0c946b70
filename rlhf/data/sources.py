"""Open a data source through Hugging Face `datasets` and yield its rows as dicts, each with a "source:row" label.

A source is one string (docs/formats.md, "Where the data comes from"):
  FILE.jsonl / FILE.json         JSON lines, or (.json) an array of objects, read here, also gzip, bzip2 or xz
                                 compressed (FILE.jsonl.gz, as the Anthropic HH files come): errors name the
                                 line or row, and each row keeps its own keys and value types (Arrow would give
                                 every row every column, and datasets writes a column whose types differ
                                 between rows as JSON text)
  FILE.parquet / .csv            datasets' parquet and csv loaders (also compressed CSV, and .zst JSON)
  FOLDER                         a `save_to_disk` folder (`load_from_disk`), or any other folder as a dataset
                                 repository (data files and/or a README card; `load_dataset(FOLDER)`)
  OWNER/NAME                     a Hugging Face hub dataset (`load_dataset`), downloaded into the HF cache
Folders and hub ids take an optional config and split: `NAME[:CONFIG][@SPLIT]`, e.g.
`HuggingFaceH4/ultrafeedback_binarized@train_prefs`. Without a split: "train" if there is one, else the only one.

`datasets` is imported only when a source other than a JSON file is opened, so reading JSON stays light.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rlhf.data.jsonl import iter_jsonl
from rlhf.errors import DataError

FILE_LOADERS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
# the compressed JSON files read here (.zst is left to datasets, which reads it with zstandard)
DECOMPRESSORS: dict[str, Callable[..., Any]] = {
    ".gz": gzip.open,
    ".bz2": bz2.open,
    ".xz": lzma.open,
}
# the loader `datasets` reads a folder's files of each suffix with (`_one_format`)
FOLDER_LOADERS = {**FILE_LOADERS, ".jsonl": "json", ".txt": "text"}
DATASET_SUFFIXES = (*FILE_LOADERS, ".jsonl", *COMPRESSED)  # files read as rows of a dataset
# what the loaders are told: a JSON column whose types differ between rows is an error, not JSON text ('"good"'
# for good); only an empty CSV cell is missing, not the texts pandas takes for missing ("None", "NA", "null", ...)
LOADER_OPTIONS: dict[str, dict[str, Any]] = {
    "json": {"on_mixed_types": None},
    "csv": {"keep_default_na": False, "na_values": [""]},
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def parse_source(spec: str | Path) -> tuple[str, str | None, str | None]:
    """(path or hub id, config, split) of a source string; a path that exists is taken whole."""
    path = str(spec)
    if not path.strip():  # Path("") is the working directory, which would be read as a dataset folder
        raise DataError("an empty data path: name a file, a dataset folder or a hub dataset")
    if Path(path).exists():
        return path, None, None
    config = split = None
    if "@" in path:
        path, split = path.rsplit("@", 1)
    if ":" in path:
        path, config = path.rsplit(":", 1)
    if (split is not None and not split) or (config is not None and not config):
        raise DataError(f"{spec}: an empty config or split (expected NAME[:CONFIG][@SPLIT])")
    return path, config, split


def iter_rows(spec: str | Path, skipped: list[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("source:row", row) for each row of the source; row numbers count from 1 (JSONL: the line).

    An unreadable source is a one-line DataError. Given a `skipped` list, JSON rows that are not objects
    are appended to it instead of raising. Columns that are null in a row are left out of it, as a JSONL row
    would leave them out; so are null fields of the objects inside it (Arrow gives every message of a column
    the fields of all of them).
    """
    path, config, split = parse_source(spec)
    local = Path(path)
    if local.is_file() and config is None and split is None and _json_here(local):
        yield from _json_file_rows(local, skipped)
        return
    if local.is_dir() and not _saved(local) and _one_format(spec, local) == "json":
        files = _split_files(spec, local, config, split)
        if all(_json_here(f) for f in files):
            for f in files:
                yield from _json_file_rows(f, skipped)
            return
    dataset = open_dataset(spec).with_format("arrow")  # Arrow batches to Python: much quicker than row by row
    rows = (row for batch in dataset.iter(batch_size=1024) for row in batch.to_pylist())
    for i, row in enumerate(rows, start=1):
        yield f"{spec}:{i}", _without_nulls(row)


def text_field(row: dict[str, Any], key: str, where: str) -> str:
    """row[key], which must be a string; a one-line error naming `where` (source:row) otherwise."""
    if key not in row:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(row[key], str):
        raise DataError(f"{where}: field {key!r} should be str, got {type(row[key]).__name__}")
    return str(row[key])


def open_dataset(spec: str | Path) -> Any:
    """The source as one `datasets.Dataset` (one split); DataError with the reason if it cannot be read."""
    path, config, split = parse_source(spec)
    local = Path(path)
    if local.is_file():
        if config is not None or split is not None:
            raise DataError(f"{spec}: a file has no config or split")
        suffix = data_suffix(local)  # datasets decompresses json and csv files
        loader = FILE_LOADERS.get(suffix) or ("json" if suffix == ".jsonl" else None)  # a file: no .txt
        if loader is None:
            raise DataError(
                f"{local}: unknown file type (expected .jsonl, .json, .parquet or .csv, the text ones maybe .gz)"
            )
        options = LOADER_OPTIONS.get(loader, {})
        return _load(
            spec,
            lambda d, **cache: d.load_dataset(
                loader, data_files=str(local), split="train", **cache, **options
            ),
        )
    if local.is_dir():
        if _saved(local):
            if config is not None:
                raise DataError(f"{spec}: a save_to_disk folder has no config")
            return _pick_split(spec, _load(spec, lambda d, **_: d.load_from_disk(str(local))), split)
        kind = _one_format(spec, local)
        if kind is None:  # datasets would say it "couldn't resolve pattern **"
            raise DataError(f"{spec}: no data files in this folder (.jsonl, .json, .parquet, .csv or .txt files, "
                            "or a save_to_disk folder)")  # fmt: skip
        options = LOADER_OPTIONS.get(kind, {})
        return _pick_split(
            spec,
            _load(
                spec, lambda d, **cache: d.load_dataset(str(local), config, split=split, **cache, **options)
            ),
            split,
        )
    # A missing path is a typo, not a hub id, when it has a file suffix or names a folder that is here.
    in_local_folder = local.parent != Path(".") and local.parent.is_dir()
    if local.suffix in DATASET_SUFFIXES or not HUB_ID.fullmatch(path) or in_local_folder:
        raise DataError(f"{local}: file not found")
    return _pick_split(
        spec, _load(spec, lambda d: d.load_dataset(path, config, split=split), local=False), split
    )


def data_suffix(path: Path) -> str:
    """The suffix that says what a data file holds: ".json" for "x.json.gz"."""
    return path.suffixes[-2] if path.suffix in COMPRESSED and len(path.suffixes) > 1 else path.suffix


def _json_here(path: Path) -> bool:
    """Whether a file is JSON that is read here, not by datasets (whose json loader writes a column whose values
    differ in type between rows as JSON text, '"good"' for good): so that each row keeps its own values, and an
    error names its line or row."""
    readable = path.suffix not in COMPRESSED or path.suffix in DECOMPRESSORS
    return readable and data_suffix(path) in (".json", ".jsonl")


def _json_file_rows(path: Path, skipped: list[str] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line or row", row) for each row of a JSON file `_json_here` reads."""
    if data_suffix(path) == ".jsonl":
        for lineno, row in iter_jsonl(path, skipped, DECOMPRESSORS.get(path.suffix)):
            yield f"{path}:{lineno}", row
        return
    for where, row in _json_rows(path, skipped):
        yield where, _without_nulls(row)  # as datasets gave them (pandas writes absent values as null)


def _saved(folder: Path) -> bool:
    """Whether a folder was written by `save_to_disk`."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _split_files(spec: str | Path, folder: Path, config: str | None, split: str | None) -> list[Path]:
    """The data files of a dataset folder's split, as `datasets` resolves them (its README's configs, or the
    file names: train.json, data/test-*.json, ...)."""
    builder = _load(
        spec, lambda d, cache_dir, **_: d.load_dataset_builder(str(folder), config, cache_dir=cache_dir)
    )
    splits = {
        str(name): [Path(f) for f in files] for name, files in (builder.config.data_files or {}).items()
    }
    if not splits:
        raise DataError(f"{spec}: no data files")
    return list(_pick_split(spec, splits, split))


def _json_rows(local: Path, skipped: list[str] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """The rows of a JSON file (maybe compressed): an array of objects, or one object per line. Read here, not
    by datasets, whose json loader writes a column whose values differ in type between rows as JSON text
    ('"good"' for good), so that each row keeps its own values and an error names its row."""
    opener = DECOMPRESSORS.get(local.suffix)
    try:
        with (opener or Path.open)(local, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{local}: not UTF-8 text (byte {e.start + 1})") from None
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"{local}: cannot read it ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":  # one object per line parses as its first object, then "Extra data"
            raise DataError(f"{local}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        for lineno, row in iter_jsonl(local, skipped, opener):
            yield f"{local}:{lineno}", row
        return
    if isinstance(data, dict) and len(text.strip().splitlines()) > 1:
        raise DataError(
            f"{local}: one JSON object, not rows (expected an array of objects, or one object per line)"
        )
    for i, row in enumerate(data if isinstance(data, list) else [data], start=1):
        if isinstance(row, dict):
            yield f"{local}:{i}", row
            continue
        error = f"{local}:{i}: expected a JSON object, got {type(row).__name__}"
        if skipped is None:
            raise DataError(error)
        skipped.append(error)


def _without_nulls(value: Any) -> Any:
    """The value with null fields left out of every dict in it, at any depth."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _load(spec: str | Path, load: Any, local: bool = True) -> Any:
    """load(datasets module, **cache options) with any failure as one line. Local data is converted in a
    throwaway cache and kept in memory (re-reading a local file is cheap, and a cache entry per file read
    would pile up); a hub dataset uses the HF cache, so it is downloaded once."""
    import datasets

    datasets.disable_progress_bars()
    # datasets logs each failure itself, over several lines, before raising it: the one line below says it
    datasets_log = logging.getLogger("datasets")
    level = datasets_log.level
    datasets_log.setLevel(logging.CRITICAL)
    try:
        if not local:
            return load(datasets)
        with tempfile.TemporaryDirectory(prefix="rlhf-datasets-") as cache:
            return load(datasets, cache_dir=cache, keep_in_memory=True)
    except Exception as e:  # datasets and pyarrow raise many kinds; the user needs the reason on one line
        raise DataError(f"{spec}: cannot read it as a dataset ({_first_cause(e)})") from None
    finally:
        datasets_log.setLevel(level)


def _first_cause(e: BaseException) -> str:
    """The first line of the innermost exception `e` was raised from (datasets wraps a CSV's bad byte or unclosed
    quote in "An error occurred while generating the dataset"), with its type where it says little alone."""
    seen = {id(e)}
    while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        e = inner
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if "corresponds to no data" in (lines or [""])[0]:  # a CSV of a header alone, a folder of empty files
        return "no rows"
    # pyarrow's cast errors print both schemas, then the reason ("because column names don't match": a
    # dataset folder whose splits have different columns)
    reason = next((line for line in reversed(lines[1:]) if line.startswith("because ")), None)
    line = " ".join(x for x in (lines[0] if lines else "", reason) if x)
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _one_format(spec: str | Path, folder: Path) -> str | None:
    """The loader of the folder's data files (None: it has none). A folder of data files is read as one format:
    `datasets` takes the files of one and leaves the others out without a word, so a folder that mixes them is
    an error."""
    kinds = set()
    for f in folder.rglob("*"):
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts):
            kind = FOLDER_LOADERS.get(data_suffix(f))
            if kind is not None:
                kinds.add(kind)
    if len(kinds) > 1:
        raise DataError(f"{spec}: the folder mixes {', '.join(sorted(kinds))} files, and a folder is read as one "
                        "format (the others would be left out): keep one format there, or name each file")  # fmt: skip
    return next(iter(kinds), None)


def _pick_split(spec: str | Path, data: Any, split: str | None) -> Any:
    """One Dataset out of a Dataset or DatasetDict: `split`, else "train", else the only split. A single Dataset
    asked for another split than its own is an error (a saved one-split folder's "@test" was all of it)."""
    import datasets

    if isinstance(data, datasets.Dataset):
        own = str(data.split) if data.split is not None else "train"
        if split is not None and split != own:
            raise DataError(f"{spec}: no split {split!r}; it holds one dataset (split {own!r})")
        return data
    names = list(data)
    if split is None:
        split = "train" if "train" in names else names[0] if len(names) == 1 else None
    if split is None:
        raise DataError(f"{spec}: choose a split with @SPLIT, one of: {', '.join(names)}")
    if split not in names:
        raise DataError(f"{spec}: no split {split!r}; its splits: {', '.join(names)}")
    return data[split]
