"""Training prompts from a file or folder: .txt, .jsonl, .csv, .parquet, or a Hugging Face dataset folder.

TDM is data-free: prompts are its only training data (method.md E; JourneyDB captions in the paper).
Every prompt is whitespace-normalised (Unicode NFC, runs of whitespace incl. newlines -> one space, stripped);
blank prompts are dropped. Duplicates: `load_prompts` keeps the first occurrence of each prompt and drops the
rest (`keep_duplicates=True` keeps them, weighting repeated prompts); `drop_duplicates` also says how many
went. The unconditional / negative prompt is not read from the file: it is a separate setting (default "").
"""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from pathlib import Path
from typing import Any

from ..errors import TDMError
from ..optional import require

PROMPT_COLUMNS = ("prompt", "caption", "text")  # tried in this order when no column is given
SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")


class PromptSourceError(TDMError, ValueError):
    """A prompt file or folder that cannot be read; the message names it and what was expected."""


def normalize_prompt(text: str) -> str:
    """NFC, every run of whitespace (newlines and tabs too) to one space, no leading or trailing space."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def read_prompts(source: str | Path, *, column: str | None = None) -> list[str]:
    """Normalised, non-blank prompts of `source` in file order, duplicates kept.

    `column` names the prompt field of a table format (.jsonl, .csv, .parquet, dataset folder; a .txt file has
    one prompt per line and no columns); None takes the first of PROMPT_COLUMNS present. A folder is a
    `datasets.save_to_disk` folder, or else every file with a suffix in SUFFIXES below it (recursively, by
    sorted path; hidden files skipped)."""
    path = Path(source)
    if path.is_dir():
        raw = _read_folder(path, column)
    elif path.is_file():
        raw = _read_file(path, column)
    else:
        raise PromptSourceError(f"prompts: {path} does not exist (expected a {'/'.join(SUFFIXES)} file or a folder)")
    prompts = [normalize_prompt(p) for p in raw if p is not None]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise PromptSourceError(f"prompts: {path} holds no prompts (empty, or every entry is blank)")
    return prompts


def drop_duplicates(prompts: list[str]) -> tuple[list[str], int]:
    """Keep the first occurrence of each prompt; returns (unique prompts in order, number dropped)."""
    unique = list(dict.fromkeys(prompts))
    return unique, len(prompts) - len(unique)


def load_prompts(source: str | Path, *, column: str | None = None, keep_duplicates: bool = False) -> list[str]:
    """`read_prompts`, then `drop_duplicates` unless `keep_duplicates`."""
    prompts = read_prompts(source, column=column)
    return prompts if keep_duplicates else drop_duplicates(prompts)[0]


def _read_folder(path: Path, column: str | None) -> list[str | None]:
    if _is_saved_dataset(path):
        return _read_hf_dataset(path, column)
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(path).parts))
    if not files:
        raise PromptSourceError(f"prompts: folder {path} has no {'/'.join(SUFFIXES)} files and is not a "
                                f"`datasets.save_to_disk` folder")
    return [p for f in files for p in _read_file(f, column)]


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or all(
        (path / name).is_file() for name in ("dataset_info.json", "state.json"))


def _read_file(path: Path, column: str | None) -> list[str | None]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, column)
    if suffix not in SUFFIXES:
        raise PromptSourceError(f"prompts: {path} has an unknown suffix {suffix!r} (expected one of {SUFFIXES} "
                                f"or a folder)")
    text = _decode(path)
    if suffix == ".txt":
        return text.split("\n")
    if suffix == ".jsonl":
        return _read_jsonl(path, text, column)
    return _read_csv(path, text, column)


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as some spreadsheet exports write, is allowed
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise PromptSourceError(f"prompts: {path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                                f"re-save it as UTF-8") from None


def _pick_column(where: str, available: list[str], column: str | None) -> str:
    if column is not None and column in available:
        return column
    if column is None:
        found = [c for c in PROMPT_COLUMNS if c in available]
        if found:
            return found[0]
        wanted = f"none of the default prompt columns {list(PROMPT_COLUMNS)}"
    else:
        wanted = f"no column {column!r}"
    raise PromptSourceError(f"prompts: {where} has {wanted}; available columns: {available} "
                            f"(choose one with column=, --column or backbone.prompt_column)")


def _string_or_none(path: Path, where: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise PromptSourceError(f"prompts: {path}{where}: expected a string prompt, got {type(value).__name__} {value!r}")


def _read_jsonl(path: Path, text: str, column: str | None) -> list[str | None]:
    out: list[str | None] = []
    chosen = None
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptSourceError(f"prompts: {path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise PromptSourceError(f"prompts: {path}:{lineno}: expected one JSON object per line, "
                                    f"got {type(record).__name__}")
        chosen = chosen or _pick_column(f"{path}:{lineno}", list(record), column)  # from the first record
        if chosen not in record:
            _pick_column(f"{path}:{lineno}", list(record), chosen)  # raises, listing this line's columns
        out.append(_string_or_none(path, f":{lineno}", record[chosen]))
    return out


def _read_csv(path: Path, text: str, column: str | None) -> list[str | None]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return []
    column = _pick_column(str(path), list(reader.fieldnames), column)
    return [row[column] for row in reader]  # None where a row is short: dropped as blank


def _read_parquet(path: Path, column: str | None) -> list[str | None]:
    pq = require("pyarrow.parquet", f"prompts: reading {path} (a parquet file)", error=PromptSourceError)
    column = _pick_column(str(path), pq.read_schema(path).names, column)
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    return [_string_or_none(path, f" row {i}", v) for i, v in enumerate(values)]


def _read_hf_dataset(path: Path, column: str | None) -> list[str | None]:
    datasets = require("datasets", f"prompts: reading {path} (a Hugging Face dataset folder)",
                       error=PromptSourceError)
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        if "train" not in dataset and len(splits) != 1:
            raise PromptSourceError(f"prompts: {path} holds the splits {splits} and none is 'train'; pass the "
                                    f"split's own folder")
        dataset = dataset["train" if "train" in dataset else splits[0]]
    column = _pick_column(str(path), list(dataset.column_names), column)
    return [_string_or_none(path, f" row {i}", v) for i, v in enumerate(dataset[column])]
