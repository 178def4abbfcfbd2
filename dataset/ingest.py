"""Ingestion: a dataset spec's files -> vocabularies, leak-free behavior histories, splits, model-ready columns.

Columnar throughout: files are read with pyarrow (only the declared columns), ids are dictionary-encoded
into integer codes whose order is the raw ids' sorted order, and every step after that is a vectorised numpy
operation over those codes — no Python object per event. Events are ordered by (user, timestamp), stable, so
equal timestamps keep the files' order. Validation happens while reading, before anything is written
anywhere: a bad file raises `DataError` naming the file, the column and the first bad row.
"""

from __future__ import annotations

import glob
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataset.errors import DataError, bad_data
from dataset.prepared import SPLITS, HistoryIndex, KnownUsers, PreparedData, Samples
from dataset.schema import OOV, PAD, FeatureSchema, FieldSchema, Vocab
from dataset.spec import DatasetSpec, FieldSpec, KeyedTable, Table, VocabularyPolicy

log = logging.getLogger(__name__)


# --- reading ---------------------------------------------------------------------------------------------
def files_of(spec: DatasetSpec, table: Table, what: str) -> list[Path]:
    pattern = spec.resolve(table.path)
    files = sorted(Path(p) for p in glob.glob(pattern))
    if not files:
        raise DataError(f"{pattern}: no file matches the {what} path", file=pattern)
    return files


def _read_file(file: Path, table: Table, columns: list[str], strings: set[str]):
    """One file -> a pyarrow Table of exactly `columns` (ids read as strings); errors name the file."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    kind = table.file_format()
    if file.is_file() and file.stat().st_size == 0:
        raise DataError(f"{file}: an empty file (0 bytes, no header and no rows)", file=str(file))
    try:
        if kind == "parquet":
            present = pq.read_schema(file).names
            _check_columns(file, present, columns)
            result = pq.read_table(file, columns=columns)
        elif kind == "csv":
            parse = pacsv.ParseOptions(delimiter=table.delimiter, quote_char=False if table.delimiter == "\t" else '"')
            with open(file, "rb") as handle:
                header = handle.readline().decode("utf-8", "replace").rstrip("\r\n")
            present = header.split(table.delimiter) if header else []
            _check_columns(file, present, columns)
            convert = pacsv.ConvertOptions(include_columns=columns,
                                           column_types={c: pa.string() for c in strings if c in present})
            result = pacsv.read_csv(file, parse_options=parse, convert_options=convert)
        else:
            result = pajson.read_json(file)
            _check_columns(file, result.column_names, columns)
            result = result.select(columns)
    except DataError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as error:
        located = _locate_parse_error(file, kind, table.delimiter, columns)
        if located is not None:
            raise located from None
        raise DataError(f"{file}: cannot be read as {kind} ({str(error).splitlines()[0]})", file=str(file)) from None
    if result.num_rows == 0:
        raise DataError(f"{file}: no rows (an empty file)", file=str(file))
    for name in strings & set(columns):
        column = result.column(name)
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            if pa.types.is_floating(column.type):
                raise bad_data(file, name, None, f"ids must be strings or integers, not {column.type}")
            result = result.set_column(result.column_names.index(name), name, column.cast(pa.string()))
    return result


def _locate_parse_error(file: Path, kind: str, delimiter: str, columns: list[str]) -> DataError | None:
    """pyarrow's parse errors do not say which row (or count rows per block): find the first bad row."""
    import csv
    import json

    try:
        with open(file, encoding="utf-8", newline="") as handle:
            if kind == "csv":
                reader = csv.reader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t"
                                    else csv.QUOTE_MINIMAL)
                header = next(reader, [])
                for row, values in enumerate(reader, start=1):
                    if len(values) != len(header):
                        return bad_data(file, None, row, f"expected {len(header)} {delimiter!r}-separated "
                                        f"values (the header's), got {len(values)}")
            elif kind == "jsonl":
                kinds: dict[str, tuple[str, int]] = {}
                for row, line in enumerate((line for line in handle if line.strip()), start=1):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        return bad_data(file, None, row, f"not valid JSON ({error.msg})")
                    if not isinstance(record, dict):
                        return bad_data(file, None, row, "a line must be a JSON object")
                    for name in columns:
                        value = record.get(name)
                        if value is None:
                            continue
                        kind_of = "number" if isinstance(value, int | float) and not isinstance(value, bool) \
                            else type(value).__name__
                        first = kinds.setdefault(name, (kind_of, row))
                        if first[0] != kind_of:
                            return bad_data(file, name, row, f"a {kind_of} where row {first[1]} has a {first[0]} "
                                            f"(got {value!r})")
    except (OSError, UnicodeDecodeError) as error:
        return DataError(f"{file}: cannot be read ({error})", file=str(file))
    return None


def read_columns(file: Path, table: Table, columns: list[str], strings: set[str]):
    """One file's `columns` as a pyarrow Table (`strings` read as strings), validated like ingestion's."""
    return _read_file(Path(file), table, columns, strings)


def _check_columns(file: Path, present: list[str], wanted: list[str]) -> None:
    for name in wanted:
        if name not in present:
            raise bad_data(file, name, None, f"missing column (the file has {present})")


def _first_bad(file: Path, column: str, bad: np.ndarray, values, problem: str) -> DataError:
    row = int(np.flatnonzero(bad)[0])
    value = values[row]
    return bad_data(file, column, row + 1, f"{problem} (got {value!r})")


def _ids(file: Path, table, name: str) -> np.ndarray:
    import pyarrow.compute as pc

    column = table.column(name)
    missing = pc.or_kleene(column.is_null(), pc.equal(column, ""))
    if pc.any(missing).as_py():
        nulls = np.asarray(pc.fill_null(missing, True).to_numpy(zero_copy_only=False))
        raise bad_data(file, name, int(np.flatnonzero(nulls)[0]) + 1, "missing id (null or empty)")
    _refuse_nul(file, name, column)
    return column


NUL_PROBLEM = ("holds a NUL character (\\x00), which ids and tokens may not: it would be lost, and the value "
               "merged with the same text without it")


def _refuse_nul(file: Path, name: str, column) -> None:
    """A DataError at the first row of a string `column` (plain, dictionary-encoded or lists of strings) whose
    text holds a NUL character. numpy's str arrays drop trailing NULs, so "a\\x00" would silently become "a"."""
    import pyarrow as pa
    import pyarrow.compute as pc

    start = 0
    for chunk in _chunks(column):
        kind = chunk.type
        if pa.types.is_dictionary(kind) and _is_text(kind.value_type):
            bad_values = pc.match_substring(chunk.dictionary, "\x00")
            bad = pc.take(bad_values, chunk.indices) if pc.any(bad_values).as_py() else None
        elif _is_text(kind):
            bad = pc.match_substring(chunk, "\x00")
        elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and _is_text(kind.value_type):
            flat = pc.match_substring(pc.list_flatten(chunk), "\x00")
            if pc.any(flat).as_py():
                parents = np.asarray(pc.list_parent_indices(chunk).to_numpy(zero_copy_only=False))
                row = int(parents[np.flatnonzero(np.asarray(pc.fill_null(flat, False)))[0]])
                raise bad_data(file, name, start + row + 1, NUL_PROBLEM)
            bad = None
        else:
            bad = None
        if bad is not None and pc.any(bad).as_py():
            row = int(np.flatnonzero(np.asarray(pc.fill_null(bad, False).to_numpy(zero_copy_only=False)))[0])
            raise bad_data(file, name, start + row + 1, NUL_PROBLEM)
        start += len(chunk)


def _timestamps(file: Path, table, name: str, fmt: str | None) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column(name)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        if fmt is None:  # numbers written as strings (a CSV column with one bad value) are still seconds
            as_number = pc.cast(pc.if_else(pc.match_substring_regex(column, r"^\s*-?\d+(\.\d*)?\s*$"),
                                           column, None), pa.float64())
            parsed = pc.coalesce(pc.cast(pc.floor(as_number), pa.int64()), _iso_seconds(column))
        elif fmt == "iso":
            parsed = _iso_seconds(column)
        else:
            parsed = pc.cast(pc.strptime(column, format=fmt, unit="s", error_is_null=True), pa.int64())
        values = parsed.to_numpy(zero_copy_only=False)
        bad = np.asarray(parsed.is_null().to_numpy(zero_copy_only=False))
        if bad.any():
            raise _first_bad(file, name, bad, column.to_pylist(), "not a timestamp"
                             + (f" in the format {fmt!r}" if fmt and fmt != "iso" else
                                " (numbers are seconds since the epoch; strings ISO 8601, or set timestamp_format)"))
        return values.astype(np.int64)
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        seconds = pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64())
        if seconds.null_count:
            bad = np.asarray(seconds.is_null().to_numpy(zero_copy_only=False))
            raise _first_bad(file, name, bad, column.to_pylist(), "missing timestamp")
        return seconds.to_numpy(zero_copy_only=False).astype(np.int64)
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise bad_data(file, name, None, f"timestamps must be numbers or strings, not {column.type}")
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise _first_bad(file, name, bad, column.to_pylist(), "not a finite timestamp")
    return np.floor(values).astype(np.int64)


def _iso_seconds(column):
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values = column.to_pylist()
        import datetime as dt

        out = []
        for value in values:
            try:
                stamp = dt.datetime.fromisoformat(value)
                if stamp.tzinfo is None:
                    stamp = stamp.replace(tzinfo=dt.UTC)
                out.append(int(stamp.timestamp()))
            except (TypeError, ValueError):
                out.append(None)
        return pa.array(out, pa.int64())


def _numbers(file: Path, table, name: str, what: str) -> np.ndarray:
    import pyarrow as pa

    column = table.column(name)
    if pa.types.is_boolean(column.type) or pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):  # "1"/"0" (JSON strings)
        import pyarrow.compute as pc

        try:
            values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raw = column.to_pylist()
            raise _first_bad(file, name, np.array([_not_number(v) for v in raw]), raw,
                             f"{what} must be numbers") from None
    else:
        raise bad_data(file, name, None, f"{what} must be numbers, not {column.type}")
    if column.null_count:
        bad = np.asarray(column.is_null().to_numpy(zero_copy_only=False))
        raise _first_bad(file, name, bad, column.to_pylist(), f"missing {what}")
    return values


BATCH_ROWS = 1 << 20  # rows per batch when scanning a Parquet file


def _event_tables(spec: DatasetSpec, columns: list[str], whole_files: bool):
    """-> (file, part, the part's first row in the file) over the event files: each Parquet file in batches of
    `BATCH_ROWS` (row groups decoded one at a time), every other file (or with `whole_files`) as one table."""
    events = spec.events
    strings = {events.user, events.item}
    for file in files_of(spec, events, "events"):
        batches = None if whole_files else _parquet_batches(file, events, columns, strings)
        if batches is None:
            yield file, _read_file(file, events, columns, strings), 0
            continue
        start = 0
        for batch in batches:
            yield file, batch, start
            start += batch.num_rows


def _parquet_batches(file: Path, table: Table, columns: list[str], strings: set[str]):
    """A Parquet file's record batches of `columns`, string ids decoded straight into dictionary arrays and
    integer ids into dictionaries of strings; None where the batch path does not apply (another format, an
    unreadable or empty file, a missing column, ids of another type): `_read_file` then reads (and judges)
    the file whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if table.file_format() != "parquet":
        return None
    try:
        handle = pq.ParquetFile(file)
        schema = handle.schema_arrow
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError):
        return None
    if handle.metadata.num_rows == 0 or any(name not in schema.names for name in columns):
        return None
    types = {name: schema.field(name).type for name in strings & set(columns)}
    text = [n for n, t in types.items() if _is_text(t) or (pa.types.is_dictionary(t) and _is_text(t.value_type))]
    numbers = [n for n, t in types.items() if pa.types.is_integer(t)]
    if len(text) + len(numbers) != len(types):
        return None
    handle = pq.ParquetFile(file, read_dictionary=text)

    def batches():
        import pyarrow.compute as pc

        try:
            for batch in handle.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                if numbers:
                    arrays = [_string_dictionary(pc.dictionary_encode(batch.column(name))) if name in numbers
                              else batch.column(name) for name in batch.schema.names]
                    batch = pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)
                yield batch
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as error:
            raise DataError(f"{file}: cannot be read as parquet ({str(error).splitlines()[0]})",
                            file=str(file)) from None

    return batches()


def _is_text(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _string_dictionary(array):
    """A dictionary array whose dictionary is cast to strings (integer ids read as strings)."""
    import pyarrow as pa

    return pa.DictionaryArray.from_arrays(array.indices, array.dictionary.cast(pa.string()))


def _chunks(column) -> list:
    import pyarrow as pa

    return column.chunks if isinstance(column, pa.ChunkedArray) else [column]


@dataclass
class _Events:
    users: list  # per part read, a pyarrow (dictionary-encoded or string) array or chunked array of ids
    items: list
    timestamps: np.ndarray
    labels: np.ndarray  # float32 0/1
    clicks: np.ndarray  # bool: counts for the behavior feature
    columns: dict  # name -> pyarrow ChunkedArray (event-side fields)
    origin: list[tuple[Path, int]]  # (file, first global row) per file, to name a row


def read_events(spec: DatasetSpec, whole_files: bool = False) -> _Events:
    """The events of every file, validated. Parquet files are scanned a batch at a time (only the declared
    columns, ids dictionary-encoded as they are decoded), other formats and `whole_files` read each file in
    one piece: then a bad row's number counts from its file's first row (see `prepare`)."""
    import pyarrow as pa

    events = spec.events
    fields = [f for f in [*spec.user_fields, *spec.item_fields] if f.source == "events"]
    click_rule = spec.behavior.clicks if spec.behavior.clicks != "label" else None
    wanted = list(dict.fromkeys([events.user, events.item, events.timestamp, *events.label.columns(),
                                 *(f.source_column for f in fields),
                                 *([click_rule.column] if click_rule else [])]))
    users, items, stamps, labels, clicks, extra, origin = [], [], [], [], [], {}, []
    offset = 0
    for file, table, file_start in _event_tables(spec, wanted, whole_files):
        users.append(_ids(file, table, events.user))
        items.append(_ids(file, table, events.item))
        stamps.append(_timestamps(file, table, events.timestamp, events.timestamp_format))
        if events.label.click is not None:
            values = _numbers(file, table, events.label.click, "labels")
            bad = (values != 0) & (values != 1)
            if bad.any():
                raise _first_bad(file, events.label.click, bad, table.column(events.label.click).to_pylist(),
                                 "a click label must be 0 or 1")
            label = values.astype(np.float32)
        else:
            ratings = _numbers(file, table, events.label.rating, "ratings")
            label = (ratings > events.label.threshold).astype(np.float32)
        labels.append(label)
        if click_rule is not None:
            column = table.column(click_rule.column).to_numpy(zero_copy_only=False)
            clicks.append(np.isin(column.astype(str), [str(v) for v in click_rule.values]))
        else:
            clicks.append(label > 0.5)
        for spec_field in fields:
            extra.setdefault(spec_field.source_column, []).append(table.column(spec_field.source_column))
        origin.append((file, offset - file_start))
        offset += table.num_rows
    chunked = {name: pa.chunked_array([c for part in parts for c in _chunks(part)]) for name, parts in extra.items()}
    return _Events(users, items, np.concatenate(stamps), np.concatenate(labels), np.concatenate(clicks), chunked,
                   origin)


def _where(origin: list[tuple[Path, int]], row: int) -> tuple[Path, int]:
    """Global row -> (file, row in that file counting from 1)."""
    starts = [start for _, start in origin]
    index = int(np.searchsorted(starts, row, side="right")) - 1
    return origin[index][0], row - origin[index][1] + 1


def sorted_codes(values, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (codes `dtype` [n], distinct values str [k]) with codes ordered like the sorted values.

    `values` is an array, a chunked array or a list of them (the parts read), plain or dictionary-encoded."""
    codes, distinct, _ = _sorted_codes(values, dtype)
    return codes, distinct


def _sorted_codes(values, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`sorted_codes` and the rows per code. The parts' dictionaries are unified (arrow hashes each distinct
    entry once per part, not each row), the unified dictionary sorted, and the rows mapped with one gather."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = pa.dictionary(pa.int32(), pa.string())
    parts = []
    for column in values if isinstance(values, list) else [values]:
        for chunk in _chunks(column):
            if not pa.types.is_dictionary(chunk.type):
                chunk = pc.dictionary_encode(chunk)
            parts.append(chunk if chunk.type == kind else chunk.cast(kind))
    if not parts:
        return np.zeros(0, dtype), np.zeros(0, str), np.zeros(0, np.int64)
    parts = pa.chunked_array(parts, kind).unify_dictionaries().chunks
    distinct = np.asarray(parts[0].dictionary.to_numpy(zero_copy_only=False)).astype(str)
    order = np.argsort(distinct, kind="stable")
    if len(order) > np.iinfo(dtype).max:
        dtype = np.int64
    rank = np.empty(len(order), dtype)
    rank[order] = np.arange(len(order), dtype=dtype)
    codes = np.empty(sum(len(part) for part in parts), dtype)
    row = 0
    for part in parts:
        np.take(rank, part.indices.to_numpy(zero_copy_only=False), out=codes[row:row + len(part)])
        row += len(part)
    distinct = distinct[order]
    counts = np.bincount(codes, minlength=len(distinct))
    used = counts > 0
    if not used.all():  # a dictionary entry no row uses (a file's dictionary may hold more than its rows)
        renumber = (np.cumsum(used) - 1).astype(dtype)
        codes, distinct, counts = renumber[codes], distinct[used], counts[used]
    return codes, distinct, counts


# --- fields ----------------------------------------------------------------------------------------------
@dataclass
class TokenRows:
    """Per row its tokens, columnar: row r holds `values[offsets[r]:offsets[r + 1]]` (no token = missing).

    `width` is the widest row of the column the rows came from (at least 1); `take` keeps it."""

    values: np.ndarray  # str [tokens]
    offsets: np.ndarray  # int64 [rows + 1]
    width: int = 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def empty(cls, rows: int) -> TokenRows:
        return cls(np.zeros(0, str), np.zeros(rows + 1, np.int64))

    @classmethod
    def from_lists(cls, lists: list[list[str]]) -> TokenRows:
        lengths = np.fromiter((len(tokens) for tokens in lists), np.int64, count=len(lists))
        flat = [token for tokens in lists for token in tokens]
        values = np.array(flat, dtype=str) if flat else np.zeros(0, str)
        return cls(values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   max(1, int(lengths.max(initial=0))))

    @classmethod
    def concat(cls, parts: list[TokenRows]) -> TokenRows:
        if not parts:
            return cls.empty(0)
        lengths = np.concatenate([part.lengths for part in parts])
        values = np.concatenate([part.values for part in parts])
        return cls(values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   max(part.width for part in parts))

    def take(self, rows: np.ndarray) -> TokenRows:
        rows = np.asarray(rows, np.int64)
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return TokenRows(self.values[index], offsets, self.width)

    def first(self) -> tuple[np.ndarray, np.ndarray]:
        """(whether each row has a token, its first token or "")."""
        has = self.lengths > 0
        first = np.full(len(self), "", dtype=self.values.dtype if len(self.values) else str)
        first[has] = self.values[self.offsets[:-1][has]]
        return has, first


def field_tokens(file, spec: FieldSpec, column) -> TokenRows:
    """A raw column -> per row its tokens (columnar; no token = missing) and the widest row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    name = spec.source_column
    if spec.kind == "numeric":
        try:
            values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raw = column.to_pylist()
            bad = np.array([_not_number(v) for v in raw])
            raise _first_bad(file, name, bad, raw, f"field {spec.name!r} is numeric: not a number") from None
        values = np.where(_nulls(column), np.nan, values)
        labels = np.asarray(spec.bucket_labels(), dtype=object).astype(str)
        position = np.searchsorted(np.asarray(spec.buckets, np.float64), values, side="right")
        tokens = labels[np.clip(position, 0, len(labels) - 1)]
        present = ~np.isnan(values) & (tokens != "")
        return TokenRows(tokens[present], np.concatenate([[0], np.cumsum(present)]).astype(np.int64))
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    _refuse_nul(file, name, column)
    if spec.kind == "multi":
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            value_type = column.type.value_type
            if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)):
                return _python_multi(spec, column.to_pylist())  # str() of each value, as a request gives it
            lists = column
        else:
            text = pc.cast(column, pa.string())
            lists = pc.split_pattern(text, spec.separator) if spec.separator else pc.utf8_split_whitespace(text)
        return _multi_rows(spec, lists)
    text = pc.cast(column, pa.string())
    present = pc.fill_null(pc.not_equal(text, ""), False)
    values = np.asarray(pc.filter(text, present).to_numpy(zero_copy_only=False)).astype(str)
    counts = np.asarray(present.to_numpy(zero_copy_only=False), np.int64)
    return TokenRows(values if len(values) else np.zeros(0, str), np.concatenate([[0], np.cumsum(counts)]))


def _multi_rows(spec: FieldSpec, lists) -> TokenRows:
    """A list<string> array -> its non-empty tokens per row; an empty row gets `spec.empty` when declared."""
    import pyarrow.compute as pc

    rows = len(lists)
    flat = pc.list_flatten(lists)
    parents = np.asarray(pc.list_parent_indices(lists).to_numpy(zero_copy_only=False), np.int64)
    keep = pc.fill_null(pc.not_equal(flat, ""), False)
    values = np.asarray(pc.filter(flat, keep).to_numpy(zero_copy_only=False)).astype(str)
    if not len(values):
        values = np.zeros(0, str)
    parents = parents[np.asarray(keep.to_numpy(zero_copy_only=False), bool)]
    lengths = np.bincount(parents, minlength=rows).astype(np.int64)
    if spec.empty is not None and (lengths == 0).any():
        old_offsets = np.concatenate([[0], np.cumsum(lengths)])
        lengths = np.maximum(lengths, 1)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        width = max(values.dtype.itemsize // 4, len(spec.empty), 1)
        out = np.full(offsets[-1], spec.empty, dtype=f"<U{width}")
        out[offsets[parents] + np.arange(len(values)) - old_offsets[parents]] = values
        values = out
    else:
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenRows(values, offsets, max(1, int(lengths.max(initial=0))))


def _python_multi(spec: FieldSpec, lists: list) -> TokenRows:
    rows = []
    for values in lists:
        tokens = [str(v) for v in (values or []) if v is not None and str(v) != ""]
        if not tokens and spec.empty is not None:
            tokens = [spec.empty]
        rows.append(tokens)
    return TokenRows.from_lists(rows)


def _not_number(value) -> bool:
    if value is None:
        return False
    try:
        float(value)
        return False
    except (TypeError, ValueError):
        return True


def _nulls(column) -> np.ndarray:
    return np.asarray(column.is_null().to_numpy(zero_copy_only=False))


def field_vocab(spec: FieldSpec, rows: TokenRows, policy: VocabularyPolicy) -> Vocab:
    """Tokens over the given rows (each row counts once per token it holds)."""
    policy = spec.vocabulary or policy
    flat = rows.values
    tokens, counts = np.unique(flat.astype(str), return_counts=True) if len(flat) else (np.zeros(0, str),
                                                                                        np.zeros(0, int))
    return Vocab.from_counts(tokens, counts, policy.min_count, policy.max_size, policy.hash_buckets)


def _table_rows(spec: DatasetSpec, table: KeyedTable, fields: list[FieldSpec], distinct_ids: np.ndarray,
                what: str) -> tuple[list[dict], np.ndarray, dict, tuple]:
    """Read a user or item table -> (per field: per-id token rows for `distinct_ids`, found mask, numeric extras,
    the catalogue).

    Rows whose id is not among `distinct_ids` (ids the events never mention) are the catalogue: for an item
    table, (their ids, per field their token rows) — items with known features that no event shows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    columns = [f.source_column for f in fields]
    per_field: list[list] = [[] for _ in fields]
    widths = [1] * len(fields)
    extras: dict[str, np.ndarray] = {}
    seen = np.zeros(len(distinct_ids), bool)
    catalogue_ids: list[np.ndarray] = []
    catalogue_rows: list[list[TokenRows]] = [[] for _ in fields]
    for file in files_of(spec, table, what):
        wanted = list(dict.fromkeys([table.id, *columns]))
        extra_names = []
        if what == "users" and table.file_format() == "parquet":
            schema = pq.read_schema(file)
            extra_names = [n for n, t in zip(schema.names, schema.types, strict=True)
                           if n not in wanted and (pa.types.is_floating(t) or pa.types.is_integer(t))]
        data = _read_file(file, table, wanted + extra_names, {table.id})
        ids = np.asarray(_ids(file, data, table.id).to_numpy(zero_copy_only=False)).astype(str)
        position = _positions(distinct_ids, ids)
        dup = _duplicate_rows(np.unique(ids, return_inverse=True)[1].reshape(-1))  # any id, used or not
        if dup is not None:
            earlier = int(np.flatnonzero(ids == ids[dup])[0]) + 1
            raise bad_data(file, table.id, dup + 1, f"the id {ids[dup]!r} appears twice in the {what} table "
                           f"(first at row {earlier})")
        present = position >= 0
        if (seen[position[present]]).any():
            row = int(np.flatnonzero(present & seen[np.clip(position, 0, None)])[0])
            raise bad_data(file, table.id, row + 1, f"the id {ids[row]!r} appears in two {what} files")
        seen[position[present]] = True
        for k, spec_field in enumerate(fields):
            rows = field_tokens(file, spec_field, data.column(spec_field.source_column))
            widths[k] = max(widths[k], rows.width)
            per_field[k].append((position[present], rows.take(np.flatnonzero(present))))
            if what == "items":
                catalogue_rows[k].append(rows.take(np.flatnonzero(~present)))
        if what == "items":
            catalogue_ids.append(ids[~present])
        for name in extra_names:
            values = extras.setdefault(name, np.full(len(distinct_ids), np.nan))
            column = pc.cast(data.column(name), pa.float64()).to_numpy(zero_copy_only=False)
            values[position[present]] = column[present]
    token_rows = [_scatter(parts, len(distinct_ids)) for parts in per_field]
    catalogue = (np.concatenate(catalogue_ids) if catalogue_ids else np.zeros(0, str),
                 [TokenRows.concat(parts) for parts in catalogue_rows])
    return [{"rows": rows, "width": widths[k]} for k, rows in enumerate(token_rows)], seen, extras, catalogue


def _positions(distinct_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per id its position in `distinct_ids` (sorted, distinct), -1 where it is not there."""
    if not len(distinct_ids):
        return np.full(len(ids), -1, np.int64)
    found = np.minimum(np.searchsorted(distinct_ids, ids), len(distinct_ids) - 1)
    return np.where(distinct_ids[found] == ids, found, -1).astype(np.int64)


def _scatter(parts: list[tuple[np.ndarray, TokenRows]], rows: int) -> TokenRows:
    """(positions, their token rows) of each file -> token rows for every position (none where no file has it)."""
    if not parts:
        return TokenRows.empty(rows)
    position = np.concatenate([p for p, _ in parts])
    tokens = TokenRows.concat([t for _, t in parts]).take(np.argsort(position, kind="stable"))
    lengths = np.zeros(rows, np.int64)
    lengths[np.sort(position)] = tokens.lengths
    return TokenRows(tokens.values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), tokens.width)


def _duplicate_rows(position: np.ndarray) -> int | None:
    valid = np.flatnonzero(position >= 0)
    if not len(valid):
        return None
    order = np.argsort(position[valid], kind="stable")
    ranked = position[valid][order]
    same = np.flatnonzero(ranked[1:] == ranked[:-1])
    return None if not len(same) else int(valid[order][same[0] + 1])


def _event_field_rows(events: _Events, spec_field: FieldSpec, last_row: np.ndarray) -> dict:
    """A field read from the event columns: per entity, the value of its latest event (`last_row`)."""
    column = events.columns[spec_field.source_column].take(last_row)
    rows = field_tokens(events.origin[0][0], spec_field, column)
    return {"rows": rows, "width": rows.width}


# --- the whole preparation -------------------------------------------------------------------------------
def time_split(user_start: np.ndarray, user_count: np.ndarray, position: np.ndarray, owner: np.ndarray,
               valid_frac: float, test_frac: float) -> np.ndarray:
    """Per event: 0 train, 1 valid, 2 test — the last test_frac (valid_frac before it) of each user's events.

    A user with fewer than 3 events keeps them all in training."""
    def size(frac: float) -> np.ndarray:
        wanted = np.maximum(1, np.round(user_count * frac)).astype(np.int64) if frac > 0 else \
            np.zeros_like(user_count)
        return np.where(user_count >= 3, wanted, 0)

    n_test, n_valid = size(test_frac), size(valid_frac)
    count = user_count[owner]
    split = np.zeros(len(owner), np.int8)
    split[position >= count - n_test[owner] - n_valid[owner]] = 1
    split[position >= count - n_test[owner]] = 2
    return split


def _cutoff(value) -> int:
    if isinstance(value, int | float):
        return int(value)
    import datetime as dt

    stamp = dt.datetime.fromisoformat(str(value))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return int(stamp.timestamp())


def prepare(spec: DatasetSpec) -> PreparedData:
    """Read and validate the spec's files, then build the schema and every split's samples."""
    from dataset.sources import materialise

    materialise(spec)
    phase = _Phases()
    try:
        events = read_events(spec)
    except DataError:
        if spec.events.file_format() != "parquet":
            raise
        # A batch's rows count from the batch: read the files whole so that the error names its row in the file.
        events = read_events(spec, whole_files=True)
    _release_arrow_memory()
    phase('read')
    user_code, user_ids, counts = _sorted_codes(events.users, np.int32)
    item_code, item_ids, _ = _sorted_codes(events.items, np.int32)
    events.users = events.items = None  # the ids' dictionaries and indices are no longer needed
    phase('codes')
    n_users = len(user_ids)
    order = user_time_order(user_code, events.timestamps, n_users, counts)  # stable: ties keep the files' order
    phase('sort')
    ts, item_code, labels, clicked = _permute(order, events.timestamps, item_code, events.labels, events.clicks)
    events.timestamps = events.labels = events.clicks = None
    user_code = np.repeat(np.arange(n_users, dtype=np.int64), counts)  # = user_code[order]
    n = len(order)

    phase('permute')
    # Duplicated (user, item, timestamp): only possible inside a run of equal (user, timestamp).
    same = _same_user_time(user_code, ts)
    tie = np.flatnonzero(same)
    if len(tie) and spec.events.duplicates != "keep":
        keep = _deduplicate(events, order, user_code, item_code, ts, tie, spec.events.duplicates, user_ids, item_ids)
        if keep is not None:
            order, user_code, item_code, ts = order[keep], user_code[keep], item_code[keep], ts[keep]
            labels, clicked = labels[keep], clicked[keep]
            log.info("dropped %d duplicate (user, item, timestamp) events", n - len(keep))
            n = len(order)
            counts = np.bincount(user_code, minlength=n_users)
            same = _same_user_time(user_code, ts)
    del tie

    # Every user number has events (the codes come from them): starts and counts per user number.
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    owner = user_code
    position = np.arange(n, dtype=np.int64) - starts[owner]

    phase('dedup')
    split_spec = spec.split
    rng = np.random.default_rng(split_spec.seed)
    cold = np.zeros(n_users, bool)
    if split_spec.cold_user_frac > 0:
        n_cold = int(round(n_users * split_spec.cold_user_frac))
        cold[rng.choice(n_users, size=n_cold, replace=False)] = True
    if split_spec.kind == "per_user_time":
        split = time_split(starts, counts, position, owner, split_spec.valid_frac, split_spec.test_frac)
    else:
        split = np.zeros(n, np.int8)
        split[ts >= _cutoff(split_spec.valid_from)] = 1
        split[ts >= _cutoff(split_spec.test_from)] = 2
    del position
    split[cold[owner]] = 3
    train = split == 0

    phase('split')
    policy = spec.vocabulary
    train_user_counts = np.add.reduceat(train, starts, dtype=np.int64) if n else np.zeros(n_users, np.int64)
    train_users = np.flatnonzero(train_user_counts)
    users = Vocab.from_counts(user_ids[train_users], train_user_counts[train_users], policy.min_count,
                              policy.max_size, policy.hash_buckets)
    train_item_counts = np.bincount(item_code[train], minlength=len(item_ids))
    train_items = np.flatnonzero(train_item_counts)
    items = Vocab.from_counts(item_ids[train_items], train_item_counts[train_items], policy.min_count,
                              policy.max_size, policy.hash_buckets)
    del train

    phase('vocab')
    # User fields: per user number, its tokens; the vocabulary over training users.
    user_rows, user_extras, _ = _side_rows(spec, events, "users", spec.users, spec.user_fields, user_ids, order,
                                        owner, starts, counts)
    user_fields = []
    for spec_field, data in zip(spec.user_fields, user_rows, strict=True):
        user_fields.append(_field_schema(spec_field, field_vocab(spec_field, data["rows"].take(train_users),
                                                                 policy), 1))
    profiles = np.full((n_users, len(user_fields)), OOV, np.int64)
    for k, (schema_field, data) in enumerate(zip(user_fields, user_rows, strict=True)):
        has, first = data["rows"].first()
        profiles[has, k] = schema_field.vocab.lookup_many(first[has])

    phase('users')
    # Item fields: per item, its tokens; the vocabulary over the item table (or over training events).
    item_rows, _, catalogue = _side_rows(spec, events, "items", spec.items, spec.item_fields, item_ids, order,
                                         None, None, None, item_code=item_code, ts=ts)
    item_vocab_rows = _vocab_rows(items, item_ids)
    item_fields, item_table = [], {}
    for spec_field, data in zip(spec.item_fields, item_rows, strict=True):
        # From the item table: the tokens of every item the log mentions (metadata, not labels, so the
        # validation and test items' tokens are fair game); from event columns: the training events' items.
        rows = data["rows"] if spec_field.source == "items" else data["rows"].take(train_items)
        schema_field = _field_schema(spec_field, field_vocab(spec_field, rows, policy), data["width"])
        item_fields.append(schema_field)
        item_table[schema_field.name] = _item_table(data["rows"], item_vocab_rows, schema_field, len(items))
    item_catalogue = {"item_ids": catalogue["ids"].astype(str)}
    for k, schema_field in enumerate(item_fields):  # fields of the events, not of the table: none known
        rows = catalogue.get(k, TokenRows.empty(len(catalogue["ids"])))
        item_catalogue[schema_field.name] = _item_table(rows, np.arange(len(rows)) + OOV + 1, schema_field,
                                                        len(rows) + OOV + 1)[OOV + 1:]

    del order, ts  # (user fields and item fields from event columns read their latest event through them)
    phase('items')
    schema = FeatureSchema(users=users, items=items, user_fields=user_fields, item_fields=item_fields,
                           max_history=spec.behavior.max_length, item_table=item_table)

    # Behavior: every click, grouped by user in time order; an event sees the clicks before its timestamp.
    item_index = _lookup_distinct(items, item_ids)  # per item code
    clicks = item_index[item_code[clicked]]
    clicks_before = np.zeros(n + 1, np.int64)  # clicks before row i
    np.cumsum(clicked, out=clicks_before[1:])
    # The first row of each run of equal (user, timestamp): its clicks before are the run's.
    first_of_group = np.flatnonzero(np.concatenate([[True], ~same])) if n else np.zeros(0, np.int64)
    end = np.repeat(clicks_before[first_of_group], np.diff(np.append(first_of_group, n)))
    del same, first_of_group
    length = end - clicks_before[starts][owner]
    np.minimum(length, spec.behavior.max_length, out=length)
    width = spec.behavior.max_length

    phase('histories')
    known = _known_users(users, user_ids, user_rows, item_ids, item_code, clicked, starts, counts, clicks_before,
                         spec.behavior.max_length)
    positive_rate = round(float(labels.mean()), 4) if n else 0.0
    del clicked, clicks_before, starts
    phase('known')
    user_index = _lookup_distinct(users, user_ids)  # per user number
    splits = {}
    for code, name in enumerate(SPLITS):
        rows = np.flatnonzero(split == code)
        keys = user_code[rows]
        splits[name] = Samples(user=user_index[keys], item=item_index[item_code[rows]], label=labels[rows],
                               user_key=keys, profiles=profiles,
                               histories=HistoryIndex(clicks, end[rows], length[rows], width))
    del end, length, split
    phase('splits')
    stats = {"name": spec.name, "events": int(n), "users": int(n_users), "items": int(len(item_ids)),
             "positive_rate": positive_rate,
             "splits": {name: len(s) for name, s in splits.items()}}
    phase.done(n)
    return PreparedData(spec=spec, schema=schema, splits=splits, user_ids=user_ids, known_users=known,
                        stats=stats, user_columns=user_extras, item_catalogue=item_catalogue)


class _Phases:
    """Seconds per phase of `prepare`, logged at DEBUG level (what dominates, without a profiler)."""

    def __init__(self):
        self.start = self.last = (time.perf_counter(), time.process_time())
        self.seconds: dict[str, tuple[float, float]] = {}

    def __call__(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.seconds[name] = (now[0] - self.last[0], now[1] - self.last[1])
        self.last = now

    def done(self, events: int) -> None:
        wall, cpu = time.perf_counter() - self.start[0], time.process_time() - self.start[1]
        log.debug("prepare: %d events in %.2f s, %.2f s CPU (wall/CPU: %s)", events, wall, cpu,
                  ", ".join(f"{name} {w:.2f}/{c:.2f}" for name, (w, c) in self.seconds.items()))


def user_time_order(user_code: np.ndarray, ts: np.ndarray, n_users: int, counts: np.ndarray | None = None) \
        -> np.ndarray:
    """The stable order of the rows by (user, timestamp), i.e. `np.lexsort((ts, user_code))`, faster.

    numpy sorts int64 values several times faster than it argsorts them, so the rows are sorted as packed
    values: (user, timestamp, row number) in one int64, the row number (the low bits) making it stable and
    giving the order back. Where that does not fit in 63 bits the users are cut into ranges (a stable radix
    partition by range, then one packed sort per range, whose rows then need fewer bits); where even one
    user per range does not fit (timestamps spanning more than ~2^40), lexsort."""
    n = len(user_code)
    if not n:
        return np.zeros(0, np.int64)
    low = int(ts.min())
    span = int(ts.max()) - low + 1
    if counts is None:  # rows per user
        counts = np.bincount(user_code, minlength=n_users)
    shift = _range_bits(counts, span)
    if shift is None:
        return np.lexsort((ts, user_code))
    if n_users <= 1 << shift:
        return _packed_order(user_code, ts, low, span)
    cut = (user_code >> shift).astype(np.uint16)
    ranges = int(cut.max()) + 1
    # Rows grouped by user range, in file order: a pass per range while they are few, else a radix sort.
    rows = None if ranges <= 16 else np.argsort(cut, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.add.reduceat(counts, np.arange(0, n_users, 1 << shift)))])
    order = np.empty(n, np.int64)
    for number, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)):
        part = np.flatnonzero(cut == number) if rows is None else rows[lo:hi]
        order[lo:hi] = part[_packed_order(user_code[part] - (number << shift), ts[part], low, span)]
    return order


def _range_bits(counts: np.ndarray, span: int) -> int | None:
    """The widest user range (2^bits users, at most 2^16 ranges) whose packed (user, timestamp, row) keys fit
    in 63 bits; None if not even single users do."""
    n_users = len(counts)
    for bits in range(max(1, (n_users - 1).bit_length()), -1, -1):
        if (n_users - 1) >> bits >= 1 << 16:
            return None
        rows = int(np.add.reduceat(counts, np.arange(0, n_users, 1 << bits)).max())
        if ((1 << bits) * span) << max(1, (rows - 1).bit_length()) < 1 << 63:
            return bits
    return None


def _packed_order(user: np.ndarray, ts: np.ndarray, low: int, span: int) -> np.ndarray:
    """The stable order by (user, timestamp) of rows whose packed keys fit (see `user_time_order`)."""
    bits = max(1, (len(user) - 1).bit_length())
    key = user.astype(np.int64) * span
    key += ts
    key -= low
    key <<= bits
    key |= np.arange(len(user), dtype=np.int64)
    key.sort()
    key &= (1 << bits) - 1
    return key


def _release_arrow_memory() -> None:
    """Hand the batches' freed buffers back to the OS (arrow's allocator keeps them for reuse otherwise)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _same_user_time(user_code: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Per row after the first: whether it has the previous row's (user, timestamp)."""
    same = ts[1:] == ts[:-1]
    same &= user_code[1:] == user_code[:-1]
    return same


def _permute(order: np.ndarray, ts: np.ndarray, item_code: np.ndarray, labels: np.ndarray, clicked: np.ndarray):
    """(ts, item_code, labels, clicked)[order]: one gather of 16-byte records instead of four random gathers
    (a random gather costs a cache miss per row, nearly whatever the row's size). Labels are 0/1."""
    record = np.empty(len(order), np.dtype([("ts", np.int64), ("item", item_code.dtype), ("flags", np.uint8)],
                                           align=True))
    record["ts"] = ts
    record["item"] = item_code
    flags = record["flags"]
    np.copyto(flags, labels > 0.5, casting="unsafe")
    flags |= clicked.astype(np.uint8) << 1
    record = record[order]
    flags = record["flags"]
    return (record["ts"].copy(), record["item"].copy(), (flags & 1).astype(np.float32),
            (flags & 2).astype(bool))


def _lookup_distinct(vocab: Vocab, tokens: np.ndarray) -> np.ndarray:
    """`vocab.lookup_many(tokens)` for distinct tokens (no np.unique: one lookup per token already)."""
    lookup = vocab.lookup
    return np.fromiter((lookup(t) for t in tokens.tolist()), np.int64, count=len(tokens))


def _vocab_rows(vocab: Vocab, tokens: np.ndarray) -> np.ndarray:
    """Per token its own row in the vocabulary, -1 where it has none (hash buckets and OOV are not rows)."""
    index = vocab.index
    return np.fromiter((index.get(t, -1) for t in tokens.tolist()), np.int64, count=len(tokens))


def _item_table(rows: TokenRows, item_vocab_rows: np.ndarray, schema_field: FieldSchema, size: int) -> np.ndarray:
    """The item field's token indices per item vocabulary row, int64 [size, width] (PAD-filled)."""
    table = np.full((size, schema_field.width), PAD, np.int64)
    lengths = rows.lengths
    code = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    slot = np.arange(len(rows.values), dtype=np.int64) - rows.offsets[:-1][code]
    target = item_vocab_rows[code]
    keep = (target > OOV) & (slot < schema_field.width)
    table[target[keep], slot[keep]] = schema_field.vocab.lookup_many(rows.values[keep])
    return table


def _field_schema(spec_field: FieldSpec, vocab: Vocab, width: int) -> FieldSchema:
    labels = spec_field.bucket_labels() if spec_field.kind == "numeric" else None
    return FieldSchema(name=spec_field.name, kind=spec_field.kind, vocab=vocab,
                       buckets=list(spec_field.buckets) if spec_field.buckets else None, labels=labels,
                       separator=spec_field.separator, empty=spec_field.empty, width=width)


def _side_rows(spec, events, side, table, fields, distinct_ids, order, owner, starts, counts, item_code=None,
               ts=None) -> tuple[list[dict], dict, dict]:
    """Token rows per entity (user number or item code) for each field of one side; for items also the
    catalogue ({"ids": str [K], field index: TokenRows} of table rows no event mentions)."""
    results: list[dict | None] = [None] * len(fields)
    extras: dict = {}
    catalogue: dict = {"ids": np.zeros(0, str)}
    from_table = [k for k, f in enumerate(fields) if f.source == side]
    if table is not None:
        rows, _, extras, (catalogue_ids, catalogue_rows) = _table_rows(spec, table, [fields[k] for k in from_table],
                                                                       distinct_ids, side)
        catalogue["ids"] = catalogue_ids
        for k, data, extra_rows in zip(from_table, rows, catalogue_rows, strict=True):
            results[k] = data
            catalogue[k] = extra_rows
    from_events = [k for k, f in enumerate(fields) if f.source == "events"]
    if from_events:
        if side == "users":
            last = order[starts + counts - 1]
        else:
            by_item = np.lexsort((ts, item_code))
            ends = np.flatnonzero(np.concatenate([item_code[by_item][1:] != item_code[by_item][:-1], [True]]))
            last = order[by_item[ends]]
        for k in from_events:
            results[k] = _event_field_rows(events, fields[k], last)
    return results, extras, catalogue


def _known_users(users: Vocab, user_ids, user_rows, item_ids, item_code, clicked, starts, counts, clicks_before,
                 width: int) -> KnownUsers:
    """The latest behavior (after every event) and raw profile tokens of each user in the user vocabulary."""
    numbers = np.flatnonzero(_vocab_rows(users, user_ids) > OOV)
    click_items = item_code[clicked]
    first = clicks_before[starts[numbers]]
    last = clicks_before[starts[numbers] + counts[numbers]]
    length = np.minimum(last - first, width)
    history = HistoryIndex(click_items, last, length, width).gather()
    # One gather from the item ids with "" appended (the slots beyond a user's clicks point at it).
    history[np.arange(width)[None, :] >= length[:, None]] = len(item_ids)
    raw = np.append(item_ids, "").astype(str)[history]
    columns = []
    for data in user_rows:
        has, first_token = data["rows"].first()
        columns.append(np.where(has, first_token, "")[numbers])
    profile = np.stack(columns, axis=1).astype(str) if columns else np.zeros((len(numbers), 0), str)
    return KnownUsers(user_ids=user_ids[numbers], profile=profile, history=raw,
                      history_len=length.astype(np.int64))


def _deduplicate(events: _Events, order, user_code, item_code, ts, tie, policy: str, user_ids: np.ndarray,
                 item_ids: np.ndarray) -> np.ndarray | None:
    """Rows to keep (the first of each duplicated (user, item, timestamp)), or raise naming the first one."""
    rows = np.unique(np.concatenate([tie, tie + 1]))
    by = np.lexsort((rows, item_code[rows], ts[rows], user_code[rows]))
    rows = rows[by]
    same = (user_code[rows][1:] == user_code[rows][:-1]) & (ts[rows][1:] == ts[rows][:-1]) & \
        (item_code[rows][1:] == item_code[rows][:-1])
    if not same.any():
        return None
    duplicates = rows[1:][same]
    if policy == "error":
        chosen = duplicates[int(np.argmin(order[duplicates]))]
        group = rows[(user_code[rows] == user_code[chosen]) & (item_code[rows] == item_code[chosen])
                     & (ts[rows] == ts[chosen])]
        file, row = _where(events.origin, int(order[chosen]))
        earlier_file, earlier = _where(events.origin, int(order[group].min()))
        where = f"row {earlier}" if earlier_file == file else f"{earlier_file} row {earlier}"
        key = (str(user_ids[user_code[chosen]]), str(item_ids[item_code[chosen]]), int(ts[chosen]))
        raise bad_data(file, None, row, f"duplicate event: the same (user, item, timestamp) {key} as {where}; "
                       "set events.duplicates = \"drop\" (keep the first) or \"keep\" (keep both)")
    keep = np.ones(len(order), bool)
    keep[duplicates] = False
    return np.flatnonzero(keep)
