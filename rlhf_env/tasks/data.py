"""User data from local files: prompts and preference pairs, read through Hugging Face ``datasets``.

Supported files (the builder is picked from the suffix):

- ``.jsonl`` / ``.json`` -> the ``json`` builder (a ``.json`` file holds a list of records),
- ``.csv`` -> ``csv``, ``.parquet`` -> ``parquet``.

Loading never touches the network: ``datasets`` is told it is offline and not to send its
download-count ping, only for the duration of the call, and it builds into a throwaway cache
directory, so nothing is written to the user's cache and no stale cache can be read.

Every problem raises :class:`~rlhf_env.errors.DataFileError` with a message that starts with
the file's path and, for a bad field, where it is and the column: ``line N`` of a JSON-lines or
CSV file (1-based, as an editor counts; a CSV header is line 1, its first data row line 2), as the
UTF-8 check says; ``record N`` (1-based) of a JSON list or a Parquet file::

    data/prefs.jsonl: line 4, column 'chosen': expected a string, got int 7

A CSV file holds text, so its columns are read as text (``12+7=,19,18`` is three strings, not
a string and two numbers). Typed formats (JSON, Parquet) are not converted: a number where a
string belongs is an error, not a string. Text files must be UTF-8.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rlhf_env.errors import DataFileError, DataWarning
from rlhf_env.tasks.base import PreferencePair

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_STRING_DTYPES = frozenset({"string", "large_string"})


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Read the ``prompt`` column of a data file; every prompt is a non-empty string."""
    return _load_columns(path, ("prompt",))["prompt"]


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every row of a data file as a dict of all its columns; ``prompt`` is checked (non-empty strings).

    The other columns keep their types (JSON/Parquet numbers stay numbers; CSV cells are text).
    """
    cols = _load_columns(path, ("prompt",), every_column=True)
    names = list(cols)
    return [dict(zip(names, values)) for values in zip(*(cols[n] for n in names))]


def where_row(path: str | os.PathLike, row: int) -> str:
    """Where 0-based data row ``row`` of ``path`` is, as a user finds it (``line N``, ``record N``)."""
    return _where(Path(path).expanduser(), row)


def load_preferences(path: str | os.PathLike) -> list[PreferencePair]:
    """Read ``prompt``, ``chosen`` and ``rejected`` columns into preference pairs, in file order."""
    cols = _load_columns(path, ("prompt", "chosen", "rejected"))
    pairs = [PreferencePair(p, c, r) for p, c, r in zip(cols["prompt"], cols["chosen"], cols["rejected"])]
    return distinct_pairs(pairs, Path(path))


def distinct_pairs(pairs: list[PreferencePair], path: Path) -> list[PreferencePair]:
    """``pairs`` without those whose chosen equals the rejected, with a warning counting them.

    Such a pair states no preference: every preference loss is flat in it (DPO's is log 2 with zero
    gradient), yet it would count as training data. A file with no other pair is a ``DataFileError``.
    """
    ties = [i for i, p in enumerate(pairs) if p.chosen == p.rejected]
    if not ties:
        return pairs
    if len(ties) == len(pairs):
        raise DataFileError(
            f"{path}: every pair's chosen equals its rejected ({len(pairs)} pairs): no preference to learn"
        )
    where = ", ".join(_where(path, i) for i in ties[:5]) + (", ..." if len(ties) > 5 else "")
    warnings.warn(
        f"{path}: dropped {len(ties)} of {len(pairs)} pairs whose chosen equals its rejected ({where}); "
        f"training on the other {len(pairs) - len(ties)}",
        DataWarning,
        stacklevel=2,
    )
    tied = set(ties)
    return [p for i, p in enumerate(pairs) if i not in tied]


def _load_columns(path: str | os.PathLike, required: Sequence[str], every_column: bool = False) -> dict[str, list]:
    """Load ``path`` with ``datasets`` and return the ``required`` columns as checked lists of str
    (``every_column``: the other columns too, unchecked)."""
    path = Path(path).expanduser()
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        supported = ", ".join(sorted(BUILDERS))
        raise DataFileError(f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; supported: {supported}")
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "data file not found", str(path))
    if not path.is_file():
        raise DataFileError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise DataFileError(f"{path}: the file is empty")
    if builder != "parquet":
        _check_utf8(path)

    import datasets  # deferred: importing datasets costs seconds
    import pyarrow
    from datasets.exceptions import DatasetsError

    with tempfile.TemporaryDirectory(prefix="rlhf_env-data-") as cache_dir, _offline_and_quiet():
        try:
            ds = datasets.load_dataset(
                builder,
                data_files=glob.escape(str(path.resolve())),  # a literal path, not a glob pattern
                split="train",
                cache_dir=cache_dir,
                keep_in_memory=True,
                **_builder_kwargs(builder, _csv_header(path) if every_column and builder == "csv" else required),
            )
        except (DatasetsError, pyarrow.ArrowException, ValueError) as exc:  # pandas' errors are ValueErrors
            raise _parse_error(path, builder, exc, required) from exc
        if ds.num_rows == 0:
            raise DataFileError(f"{path}: no rows")
        missing = [c for c in required if c not in ds.column_names]
        if missing:
            raise DataFileError(
                f"{path}: missing column(s) {', '.join(map(repr, missing))}; found columns: {ds.column_names}"
            )
        if builder == "json" and any(not _is_string(ds.features[c]) for c in required):
            # A mixed column (datasets >= 5 reads it as Json) decodes "2" as 2: read the file itself.
            found = _first_non_string_json_field(path, required)
            if found is not None:
                raise _bad_field(path, *found)
        out = {c: _checked_column(path, c, ds.features[c], list(ds[c])) for c in required}
        return {c: out[c] if c in out else list(ds[c]) for c in ds.column_names} if every_column else out


def _is_string(feature: Any) -> bool:
    from datasets import Value

    return isinstance(feature, Value) and feature.dtype in _STRING_DTYPES


def _where(path: Path, row: int) -> str:
    """Where a 0-based data row is, as a user finds it: ``line N`` of a text file (1-based, as an
    editor counts; a CSV's header is line 1), ``record N`` (1-based) of a JSON list or Parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return f"line {row + 2}"
    if suffix == ".jsonl" or (suffix == ".json" and not _is_json_list(path)):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            lines = [i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
            if row < len(lines):
                return f"line {lines[row]}"
        return f"line {row + 1}"
    return f"record {row + 1}"


def _is_json_list(path: Path) -> bool:
    try:
        return path.read_text(encoding="utf-8").lstrip().startswith("[")
    except (OSError, UnicodeDecodeError):
        return False


def _csv_header(path: Path) -> list[str]:
    """A CSV file's column names (its first row), so every column can be read as text."""
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        return next(csv.reader(f), [])


def _builder_kwargs(builder: str, required: Sequence[str]) -> dict[str, Any]:
    if builder != "csv":
        return {}
    # CSV cells are text: keep them text (pandas would read "19" as 19 and "NA", "None", "null",
    # "nan", ... as missing); only an empty cell is missing.
    return {"keep_default_na": False, "na_values": [""], "converters": {c: str for c in required}}


def _check_utf8(path: Path) -> None:
    """Raise naming the file, line and column of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataFileError(
            f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, column {column} ({exc.reason}); "
            "save the file as UTF-8"
        ) from None


def _checked_column(path: Path, column: str, feature: Any, values: list[Any]) -> list[str]:
    """Return ``values`` if they are all strings (prompts non-empty), else raise naming the first bad row."""
    from datasets import Value

    # A column of one non-string type says so; a mixed JSON column (datasets >= 5 reads it as
    # Json) holds the decoded values, checked row by row like a string column.
    note = (
        f" (column read as {feature.dtype})"
        if isinstance(feature, Value) and feature.dtype not in _STRING_DTYPES
        else ""
    )
    for row, value in enumerate(values):
        if value is None or not isinstance(value, str):
            raise _bad_field(path, row, column, value, note)
        if column == "prompt" and value == "":
            raise DataFileError(f"{path}: {_where(path, row)}, column 'prompt': empty prompt")
    return values


def _bad_field(path: Path, row: int, column: str, value: Any, note: str = "") -> DataFileError:
    """The error for a field that is not a string."""
    if value is None:
        what = "null or missing value; expected a string"
        note = " (an empty CSV cell reads as null)" if path.suffix.lower() == ".csv" else note
    else:
        what = f"expected a string, got {type(value).__name__} {value!r}"
    return DataFileError(f"{path}: {_where(path, row)}, column {column!r}: {what}{note}")


def _parse_error(path: Path, builder: str, exc: BaseException, required: Sequence[str]) -> DataFileError:
    """Turn a ``datasets``/pyarrow/pandas failure into a DataFileError naming the file and the cause."""
    messages, seen = [], exc
    while seen is not None:
        text = str(seen).strip()
        if text and "error occurred while generating the dataset" not in text:
            messages.append(text)
        seen = seen.__cause__
    if any("corresponds to no data" in m for m in messages):  # no rows: whitespace, a header, "[]"
        return DataFileError(f"{path}: no rows")
    if builder == "json":
        # pyarrow rejects a column whose type changes between rows, often without naming the
        # row; find the first non-string field ourselves so the message names row and column.
        found = _first_non_string_json_field(path, required)
        if found is not None:
            return _bad_field(path, *found)
    cause = "; ".join(messages) or type(exc).__name__
    return DataFileError(f"{path}: cannot parse as {builder}: {cause}")


def _first_non_string_json_field(path: Path, required: Sequence[str]) -> tuple[int, str, Any] | None:
    """``(row, column, value)`` of the first non-null, non-string required field, if stdlib json finds one."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = (json.loads(line) for line in text.splitlines() if line.strip())
        for row, record in enumerate(records):
            if not isinstance(record, dict):
                return None
            for column in required:
                value = record.get(column)
                if value is not None and not isinstance(value, str):
                    return row, column, value
    except (ValueError, OSError):  # not parseable by us either: the parser's message stands
        return None
    return None


@contextlib.contextmanager
def _offline_and_quiet() -> Iterator[None]:
    """While loading: ``datasets`` offline with no download-count ping, no progress bars, no log chatter.

    ``datasets`` reads ``HF_HUB_OFFLINE``/``HF_UPDATE_DOWNLOAD_COUNTS`` from the environment once, at
    import, so setting environment variables here would be too late; its config module is patched
    for the duration of the call and restored after.
    """
    from datasets import config
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from datasets.utils import logging as ds_logging

    overrides = {"HF_HUB_OFFLINE": True, "HF_UPDATE_DOWNLOAD_COUNTS": False}
    saved = {name: getattr(config, name) for name in overrides if hasattr(config, name)}
    bars_were_off, verbosity = are_progress_bars_disabled(), ds_logging.get_verbosity()
    for name in saved:
        setattr(config, name, overrides[name])
    disable_progress_bars()
    ds_logging.set_verbosity(logging.CRITICAL)  # parse failures are re-raised with their message
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)
        ds_logging.set_verbosity(verbosity)
        if not bars_were_off:
            enable_progress_bars()
