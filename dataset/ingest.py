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
    return column


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


@dataclass
class _Events:
    users: object  # pyarrow string ChunkedArray
    items: object
    timestamps: np.ndarray
    labels: np.ndarray  # float32 0/1
    clicks: np.ndarray  # bool: counts for the behavior feature
    columns: dict  # name -> pyarrow ChunkedArray (event-side fields)
    origin: list[tuple[Path, int]]  # (file, first global row) per file, to name a row


def read_events(spec: DatasetSpec) -> _Events:
    import pyarrow as pa

    events = spec.events
    fields = [f for f in [*spec.user_fields, *spec.item_fields] if f.source == "events"]
    click_rule = spec.behavior.clicks if spec.behavior.clicks != "label" else None
    wanted = list(dict.fromkeys([events.user, events.item, events.timestamp, *events.label.columns(),
                                 *(f.source_column for f in fields),
                                 *([click_rule.column] if click_rule else [])]))
    users, items, stamps, labels, clicks, extra, origin = [], [], [], [], [], {}, []
    offset = 0
    for file in files_of(spec, events, "events"):
        table = _read_file(file, events, wanted, {events.user, events.item})
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
        origin.append((file, offset))
        offset += table.num_rows
    chunked = {name: pa.chunked_array([c for part in parts for c in part.chunks]) for name, parts in extra.items()}
    return _Events(pa.chunked_array([c for part in users for c in part.chunks], pa.string()),
                   pa.chunked_array([c for part in items for c in part.chunks], pa.string()),
                   np.concatenate(stamps), np.concatenate(labels), np.concatenate(clicks), chunked, origin)


def _where(origin: list[tuple[Path, int]], row: int) -> tuple[Path, int]:
    """Global row -> (file, row in that file counting from 1)."""
    starts = [start for _, start in origin]
    index = int(np.searchsorted(starts, row, side="right")) - 1
    return origin[index][0], row - origin[index][1] + 1


def sorted_codes(values) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (codes int64 [n], distinct values str [k]) with codes ordered like the sorted values."""
    import pyarrow as pa
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(values).combine_chunks() if isinstance(values, pa.ChunkedArray) else \
        pc.dictionary_encode(values)
    distinct = np.asarray(encoded.dictionary.to_numpy(zero_copy_only=False)).astype(str)
    order = np.argsort(distinct, kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    indices = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return rank[indices], distinct[order]


# --- fields ----------------------------------------------------------------------------------------------
def field_tokens(file, spec: FieldSpec, column) -> tuple[list[np.ndarray], int]:
    """A raw column -> per row its tokens (str arrays; [] = missing) and the widest row."""
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
        labels = np.asarray(spec.bucket_labels(), dtype=object)
        position = np.searchsorted(np.asarray(spec.buckets, np.float64), values, side="right")
        tokens = np.where(np.isnan(values), "", labels[np.clip(position, 0, len(labels) - 1)].astype(str))
        return [np.array([t]) if t else np.array([], str) for t in tokens.tolist()], 1
    if spec.kind == "multi":
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            lists = column.to_pylist()
        else:
            text = pc.cast(column, pa.string())
            lists = (pc.split_pattern(text, spec.separator) if spec.separator else
                     pc.utf8_split_whitespace(text)).to_pylist()
        rows, width = [], 1
        for values in lists:
            tokens = [str(v) for v in (values or []) if v is not None and str(v) != ""]
            if not tokens and spec.empty is not None:
                tokens = [spec.empty]
            rows.append(np.array(tokens, dtype=str))
            width = max(width, len(tokens))
        return rows, width
    text = pc.cast(column, pa.string()).to_numpy(zero_copy_only=False)
    return [np.array([str(t)]) if t is not None and str(t) != "" else np.array([], str) for t in text], 1


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


def field_vocab(spec: FieldSpec, rows: list[np.ndarray], policy: VocabularyPolicy) -> Vocab:
    """Tokens over the given rows (each row counts once per token it holds)."""
    policy = spec.vocabulary or policy
    flat = np.concatenate(rows) if rows else np.zeros(0, str)
    tokens, counts = np.unique(flat.astype(str), return_counts=True) if len(flat) else (np.zeros(0, str),
                                                                                        np.zeros(0, int))
    return Vocab.from_counts(tokens, counts, policy.min_count, policy.max_size, policy.hash_buckets)


def _table_rows(spec: DatasetSpec, table: KeyedTable, fields: list[FieldSpec], distinct_ids: np.ndarray,
                what: str) -> tuple[list[dict], np.ndarray, dict]:
    """Read a user or item table -> (per field: per-id token rows for `distinct_ids`, found mask, numeric extras).

    Rows whose id is not among `distinct_ids` are ignored (ids the events never mention)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    columns = [f.source_column for f in fields]
    index_of = {value: i for i, value in enumerate(distinct_ids.tolist())}
    per_field = [{} for _ in fields]
    widths = [1] * len(fields)
    extras: dict[str, np.ndarray] = {}
    seen = np.zeros(len(distinct_ids), bool)
    for file in files_of(spec, table, what):
        wanted = list(dict.fromkeys([table.id, *columns]))
        extra_names = []
        if what == "users" and table.file_format() == "parquet":
            schema = pq.read_schema(file)
            extra_names = [n for n, t in zip(schema.names, schema.types, strict=True)
                           if n not in wanted and (pa.types.is_floating(t) or pa.types.is_integer(t))]
        data = _read_file(file, table, wanted + extra_names, {table.id})
        ids = np.asarray(_ids(file, data, table.id).to_numpy(zero_copy_only=False)).astype(str)
        position = np.array([index_of.get(i, -1) for i in ids.tolist()], np.int64)
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
            rows, width = field_tokens(file, spec_field, data.column(spec_field.source_column))
            widths[k] = max(widths[k], width)
            for pos, tokens in zip(position.tolist(), rows, strict=True):
                if pos >= 0:
                    per_field[k][pos] = tokens
        for name in extra_names:
            values = extras.setdefault(name, np.full(len(distinct_ids), np.nan))
            column = pc.cast(data.column(name), pa.float64()).to_numpy(zero_copy_only=False)
            values[position[present]] = column[present]
    empty = np.array([], str)
    token_rows = [[per_field[k].get(i, empty) for i in range(len(distinct_ids))] for k in range(len(fields))]
    return [{"rows": rows, "width": widths[k]} for k, rows in enumerate(token_rows)], seen, extras


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
    rows, width = field_tokens(events.origin[0][0], spec_field, column)
    return {"rows": rows, "width": width}


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
    events = read_events(spec)
    user_code, user_ids = sorted_codes(events.users)
    item_code, item_ids = sorted_codes(events.items)
    ts = events.timestamps
    order = np.lexsort((ts, user_code))  # stable: ties keep the files' order
    user_code, item_code, ts = user_code[order], item_code[order], ts[order]
    labels, clicked = events.labels[order], events.clicks[order]
    n = len(order)

    # Duplicated (user, item, timestamp): only possible inside a run of equal (user, timestamp).
    tie = np.flatnonzero((user_code[1:] == user_code[:-1]) & (ts[1:] == ts[:-1]))
    if len(tie) and spec.events.duplicates != "keep":
        keep = _deduplicate(events, order, user_code, item_code, ts, tie, spec.events.duplicates)
        if keep is not None:
            order, user_code, item_code, ts = order[keep], user_code[keep], item_code[keep], ts[keep]
            labels, clicked = labels[keep], clicked[keep]
            log.info("dropped %d duplicate (user, item, timestamp) events", n - len(keep))
            n = len(order)

    boundaries = np.flatnonzero(user_code[1:] != user_code[:-1]) + 1
    starts = np.concatenate([[0], boundaries]).astype(np.int64)
    counts = np.diff(np.concatenate([starts, [n]]))
    n_users = len(user_ids)
    # Users without events keep code slots (from the dictionary) only if they had rows; here every code has events.
    owner = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    position = np.arange(n, dtype=np.int64) - starts[owner]

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
    split[cold[owner]] = 3
    train = split == 0

    policy = spec.vocabulary
    train_users, train_user_counts = np.unique(user_code[train], return_counts=True)
    users = Vocab.from_counts(user_ids[train_users], train_user_counts, policy.min_count, policy.max_size,
                              policy.hash_buckets)
    train_items, train_item_counts = np.unique(item_code[train], return_counts=True)
    items = Vocab.from_counts(item_ids[train_items], train_item_counts, policy.min_count, policy.max_size,
                              policy.hash_buckets)

    # User fields: per user number, its tokens; the vocabulary over training users.
    user_rows, user_extras = _side_rows(spec, events, "users", spec.users, spec.user_fields, user_ids, order,
                                        owner, starts, counts)
    in_training = np.zeros(n_users, bool)
    in_training[train_users] = True
    user_fields = []
    for spec_field, data in zip(spec.user_fields, user_rows, strict=True):
        rows = [r for r, keep in zip(data["rows"], in_training.tolist(), strict=True) if keep]
        user_fields.append(_field_schema(spec_field, field_vocab(spec_field, rows, policy), 1))
    profiles = np.full((n_users, len(user_fields)), OOV, np.int64)
    for k, (schema_field, data) in enumerate(zip(user_fields, user_rows, strict=True)):
        profiles[:, k] = [schema_field.vocab.lookup(r[0]) if len(r) else OOV for r in data["rows"]]

    # Item fields: per item, its tokens; the vocabulary over the item table (or over training events).
    item_rows, _ = _side_rows(spec, events, "items", spec.items, spec.item_fields, item_ids, order,
                              None, None, None, item_code=item_code, ts=ts)
    item_vocab_rows = np.array([items.index.get(i, -1) for i in item_ids.tolist()], np.int64)
    item_fields, item_table = [], {}
    train_item_mask = np.zeros(len(item_ids), bool)
    train_item_mask[train_items] = True
    for spec_field, data in zip(spec.item_fields, item_rows, strict=True):
        # From the item table: the tokens of every item the log mentions (metadata, not labels, so the
        # validation and test items' tokens are fair game); from event columns: the training events' items.
        rows = data["rows"] if spec_field.source == "items" else \
            [r for r, keep in zip(data["rows"], train_item_mask.tolist(), strict=True) if keep]
        schema_field = _field_schema(spec_field, field_vocab(spec_field, rows, policy), data["width"])
        table = np.full((len(items), schema_field.width), PAD, np.int64)
        for code, tokens in enumerate(data["rows"]):
            row = item_vocab_rows[code]
            if row > OOV and len(tokens):
                table[row, :len(tokens)] = schema_field.vocab.lookup_many(tokens[:schema_field.width])
        item_fields.append(schema_field)
        item_table[schema_field.name] = table

    schema = FeatureSchema(users=users, items=items, user_fields=user_fields, item_fields=item_fields,
                           max_history=spec.behavior.max_length, item_table=item_table)

    # Behavior: every click, grouped by user in time order; an event sees the clicks before its timestamp.
    item_index = items.lookup_many(item_ids)[item_code]
    click_rows = np.flatnonzero(clicked)
    clicks = item_index[click_rows]
    clicks_before = np.concatenate([[0], np.cumsum(clicked, dtype=np.int64)])  # clicks before row i
    group_start = np.concatenate([[True], (user_code[1:] != user_code[:-1]) | (ts[1:] != ts[:-1])])
    first_of_group = np.maximum.accumulate(np.where(group_start, np.arange(n), 0))
    end = clicks_before[first_of_group]
    user_click_start = clicks_before[starts][owner]
    length = np.minimum(end - user_click_start, spec.behavior.max_length)
    histories = HistoryIndex(clicks, end, length, spec.behavior.max_length)

    everything = Samples(user=users.lookup_many(user_ids)[user_code], item=item_index, label=labels,
                         user_key=user_code, profiles=profiles, histories=histories)
    splits = {name: everything.subset(split == code) for code, name in enumerate(SPLITS)}

    known = _known_users(users, user_ids, user_rows, item_ids, item_code, clicked, starts, counts, clicks_before,
                         spec.behavior.max_length)
    stats = {"name": spec.name, "events": int(n), "users": int(n_users), "items": int(len(item_ids)),
             "positive_rate": round(float(labels.mean()), 4) if n else 0.0,
             "splits": {name: len(s) for name, s in splits.items()}}
    return PreparedData(spec=spec, schema=schema, splits=splits, user_ids=user_ids, known_users=known,
                        stats=stats, user_columns=user_extras)


def _field_schema(spec_field: FieldSpec, vocab: Vocab, width: int) -> FieldSchema:
    labels = spec_field.bucket_labels() if spec_field.kind == "numeric" else None
    return FieldSchema(name=spec_field.name, kind=spec_field.kind, vocab=vocab,
                       buckets=list(spec_field.buckets) if spec_field.buckets else None, labels=labels,
                       separator=spec_field.separator, empty=spec_field.empty, width=width)


def _side_rows(spec, events, side, table, fields, distinct_ids, order, owner, starts, counts, item_code=None,
               ts=None) -> tuple[list[dict], dict]:
    """Token rows per entity (user number or item code) for each field of one side."""
    results: list[dict | None] = [None] * len(fields)
    extras: dict = {}
    from_table = [k for k, f in enumerate(fields) if f.source == side]
    if table is not None:
        rows, _, extras = _table_rows(spec, table, [fields[k] for k in from_table], distinct_ids, side)
        for k, data in zip(from_table, rows, strict=True):
            results[k] = data
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
    return results, extras


def _known_users(users: Vocab, user_ids, user_rows, item_ids, item_code, clicked, starts, counts, clicks_before,
                 width: int) -> KnownUsers:
    """The latest behavior (after every event) and raw profile tokens of each user in the user vocabulary."""
    known = np.array([users.known(u) for u in user_ids.tolist()], bool)
    numbers = np.flatnonzero(known)
    click_items = item_code[clicked]
    first = clicks_before[starts[numbers]]
    last = clicks_before[starts[numbers] + counts[numbers]]
    length = np.minimum(last - first, width)
    history = HistoryIndex(click_items, last, length, width).gather()
    raw = np.where(np.arange(width)[None, :] < length[:, None], item_ids[np.clip(history, 0, None)], "") \
        if len(item_ids) else np.zeros((len(numbers), width), str)
    profile = np.array([[(data["rows"][u][0] if len(data["rows"][u]) else "") for data in user_rows]
                        for u in numbers.tolist()], dtype=str).reshape(len(numbers), len(user_rows))
    return KnownUsers(user_ids=user_ids[numbers], profile=profile, history=raw.astype(str),
                      history_len=length.astype(np.int64))


def _deduplicate(events: _Events, order, user_code, item_code, ts, tie, policy: str) -> np.ndarray | None:
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
        key = (events.users[int(order[chosen])].as_py(), events.items[int(order[chosen])].as_py(), int(ts[chosen]))
        raise bad_data(file, None, row, f"duplicate event: the same (user, item, timestamp) {key} as {where}; "
                       "set events.duplicates = \"drop\" (keep the first) or \"keep\" (keep both)")
    keep = np.ones(len(order), bool)
    keep[duplicates] = False
    return np.flatnonzero(keep)
