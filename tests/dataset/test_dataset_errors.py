"""Bad data stops ingestion with a `DataError` naming the file, the column and the first bad row (data rows
count from 1, the header not included); a bad spec stops it with a `SpecError` naming the key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from dataset.errors import DataError
from dataset.ingest import prepare
from dataset.spec import SpecError, load_spec

FORMATS = ("csv", "parquet", "jsonl")
GOOD = {"user_id": ["a", "a", "b", "b"], "item_id": ["x", "y", "x", "z"], "timestamp": [1, 2, 3, 4],
        "click": [1, 0, 1, 0]}


def write_table(path: Path, columns: dict[str, list]) -> Path:
    """A small file in the format of its extension (None: an empty CSV field / a JSON null / a Parquet null)."""
    n = len(next(iter(columns.values()))) if columns else 0
    if path.suffix == ".csv":
        lines = [",".join(columns)]
        lines += [",".join("" if columns[c][i] is None else str(columns[c][i]) for c in columns) for i in range(n)]
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({c: columns[c][i] for c in columns}) + "\n" for i in range(n)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: pa.array(v) for c, v in columns.items()}), path)
    return path


def write_spec(folder: Path, events: str, events_extra: str = "", extra: str = "") -> Path:
    spec = folder / "spec.toml"
    spec.write_text(f'name = "bad"\n{extra}\n[events]\npath = "{events}"\nlabel = {{ click = "click" }}\n'
                    f"{events_extra}\n")
    return spec


def prepare_error(spec: Path) -> DataError:
    with pytest.raises(DataError) as caught:
        prepare(load_spec(spec))
    return caught.value


def assert_names(error: DataError, file: Path, column: str | None, row: int | None) -> None:
    message = str(error)
    assert str(file) in message, message
    assert error.file == str(file)
    if column is not None:
        assert f"column {column!r}" in message, message
        assert error.column == column
    if row is not None:
        assert re.search(rf"\brow {row}\b", message), message
        assert error.row == row


def bad_events(tmp_path: Path, fmt: str, events_extra: str = "", **changes) -> tuple[Path, Path]:
    columns = {**GOOD, **changes}
    columns = {k: v for k, v in columns.items() if v is not None}
    file = write_table(tmp_path / f"events.{fmt}", columns)
    return file, write_spec(tmp_path, file.name, events_extra)


@pytest.mark.parametrize("fmt", FORMATS)
def test_good_file_prepares(tmp_path, fmt):
    _, spec = bad_events(tmp_path, fmt)
    assert prepare(load_spec(spec)).stats["events"] == 4


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_column(tmp_path, fmt):
    file, spec = bad_events(tmp_path, fmt, click=None)
    error = prepare_error(spec)
    assert_names(error, file, "click", None)
    assert "missing column" in str(error)


@pytest.mark.parametrize("fmt", FORMATS)
def test_string_label_column(tmp_path, fmt):
    file, spec = bad_events(tmp_path, fmt, click=["1", "0", "yes", "0"])
    error = prepare_error(spec)
    assert_names(error, file, "click", 3)
    assert "'yes'" in str(error) and "numbers" in str(error)


@pytest.mark.parametrize("fmt", FORMATS)
def test_label_not_zero_or_one(tmp_path, fmt):
    file, spec = bad_events(tmp_path, fmt, click=[1, 0, 0, 2])
    error = prepare_error(spec)
    assert_names(error, file, "click", 4)
    assert "0 or 1" in str(error)


@pytest.mark.parametrize("fmt", FORMATS)
def test_iso_timestamp_that_does_not_parse(tmp_path, fmt):
    stamps = ["2024-01-01T00:00:00", "2024-01-02T00:00:00", "yesterday", "2024-01-03T00:00:00"]
    file, spec = bad_events(tmp_path, fmt, timestamp=stamps)
    error = prepare_error(spec)
    assert_names(error, file, "timestamp", 3)
    assert "'yesterday'" in str(error) and "timestamp_format" in str(error)


@pytest.mark.parametrize("fmt", FORMATS)
def test_numbers_as_strings_with_one_bad_value_name_that_value(tmp_path, fmt):
    file, spec = bad_events(tmp_path, fmt, timestamp=["100", "200", "300", "oops"])
    error = prepare_error(spec)
    assert_names(error, file, "timestamp", 4)
    assert "'oops'" in str(error)


@pytest.mark.parametrize("fmt", FORMATS)
def test_timestamp_not_in_the_declared_format(tmp_path, fmt):
    stamps = ["01/02/2024 10:00", "31/13/2024 10:00", "01/02/2024 11:00", "02/02/2024 11:00"]
    file, spec = bad_events(tmp_path, fmt, 'timestamp_format = "%d/%m/%Y %H:%M"', timestamp=stamps)
    error = prepare_error(spec)
    assert_names(error, file, "timestamp", 2)
    assert "%d/%m/%Y %H:%M" in str(error)


@pytest.mark.parametrize("fmt", FORMATS)
def test_timestamps_in_the_declared_format_parse(tmp_path, fmt):
    stamps = ["01/02/2024 10:00", "01/02/2024 10:01", "01/02/2024 11:00", "02/02/2024 11:00"]
    _, spec = bad_events(tmp_path, fmt, 'timestamp_format = "%d/%m/%Y %H:%M"', timestamp=stamps)
    assert prepare(load_spec(spec)).stats["events"] == 4


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_id(tmp_path, fmt):
    file, spec = bad_events(tmp_path, fmt, user_id=["a", "a", None, "b"])
    assert_names(prepare_error(spec), file, "user_id", 3)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value", ["a\x00", "\x00b", "x\x00y"], ids=["trailing", "leading", "inside"])
def test_an_id_with_a_nul_character_is_refused_not_merged(tmp_path, fmt, value):
    """numpy's str arrays drop a trailing NUL: "a\\x00" would become user "a". It is refused, row named."""
    file, spec = bad_events(tmp_path, fmt, user_id=["a", "a", value, "b"])
    error = prepare_error(spec)
    assert_names(error, file, "user_id", 3)
    assert "NUL" in str(error)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_token_with_a_nul_character_is_refused(tmp_path, fmt):
    file, spec = bad_events(tmp_path, fmt, "", genre=["g", "g\x00", "h", "h"])
    spec.write_text(spec.read_text() + '\n[[item_fields]]\nname = "genre"\nsource = "events"\n')
    error = prepare_error(spec)
    assert_names(error, file, "genre", 2)
    assert "NUL" in str(error)


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_file(tmp_path, fmt):
    file = tmp_path / f"events.{fmt}"
    if fmt == "parquet":
        write_table(file, {k: [] for k in GOOD})  # a schema and no rows
    else:
        file.write_text("")
    error = prepare_error(write_spec(tmp_path, file.name))
    assert_names(error, file, None, None)
    assert "empty" in str(error)


def test_csv_with_only_a_header(tmp_path):
    file = tmp_path / "events.csv"
    file.write_text("user_id,item_id,timestamp,click\n")
    error = prepare_error(write_spec(tmp_path, file.name))
    assert_names(error, file, None, None)
    assert "no rows" in str(error)


def test_glob_matching_no_file(tmp_path):
    spec = write_spec(tmp_path, "logs/*.parquet")
    error = prepare_error(spec)
    assert str(tmp_path / "logs" / "*.parquet") in str(error)
    assert "no file matches" in str(error)


def test_a_row_of_another_width_in_a_csv(tmp_path):
    file = tmp_path / "events.csv"
    file.write_text("user_id,item_id,timestamp,click\na,x,1,1\na,y,2,0\nb,x,3\n")
    error = prepare_error(write_spec(tmp_path, file.name))
    assert_names(error, file, None, 3)
    assert "expected 4" in str(error)


def test_a_jsonl_column_that_changes_type(tmp_path):
    file = tmp_path / "events.jsonl"
    rows = [{"user_id": "a", "item_id": "x", "timestamp": t, "click": 1 if t < 4 else "x"} for t in range(6)]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_names(prepare_error(write_spec(tmp_path, file.name)), file, "click", 5)


def test_a_jsonl_line_that_is_not_json(tmp_path):
    file = tmp_path / "events.jsonl"
    file.write_text('{"user_id": "a", "item_id": "x", "timestamp": 1, "click": 1}\n{"user_id": "a",\n')
    error = prepare_error(write_spec(tmp_path, file.name))
    assert_names(error, file, None, 2)
    assert "JSON" in str(error)


def test_errors_name_the_file_of_a_glob(tmp_path):
    (tmp_path / "logs").mkdir()
    write_table(tmp_path / "logs" / "a.parquet", GOOD)
    bad = write_table(tmp_path / "logs" / "b.parquet", {**GOOD, "click": [0, 1, 1, 5]})
    assert_names(prepare_error(write_spec(tmp_path, "logs/*.parquet")), bad, "click", 4)


# --- duplicates ------------------------------------------------------------------------------------------
DUPLICATED = {"user_id": ["a", "b", "a", "a"], "item_id": ["x", "x", "y", "x"], "timestamp": [5, 5, 6, 5],
              "click": [1, 0, 0, 0]}  # row 4 repeats row 1's (a, x, 5) with another label


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicates_error_names_the_row(tmp_path, fmt):
    file = write_table(tmp_path / f"events.{fmt}", DUPLICATED)
    error = prepare_error(write_spec(tmp_path, file.name, 'duplicates = "error"'))
    assert_names(error, file, None, 4)
    assert "as row 1" in str(error) and "('a', 'x', 5)" in str(error)


def test_duplicates_drop_keeps_the_first(tmp_path):
    file = write_table(tmp_path / "events.parquet", DUPLICATED)
    prepared = prepare(load_spec(write_spec(tmp_path, file.name, 'duplicates = "drop"')))
    assert prepared.stats["events"] == 3
    everything = np.concatenate([s.label for s in prepared.splits.values()])
    assert sorted(everything.tolist()) == [0.0, 0.0, 1.0]  # (a, x, 5) kept with the first row's label 1


def test_duplicates_keep_keeps_both(tmp_path):
    file = write_table(tmp_path / "events.parquet", DUPLICATED)
    prepared = prepare(load_spec(write_spec(tmp_path, file.name, 'duplicates = "keep"')))
    assert prepared.stats["events"] == 4


def test_duplicates_across_files_name_both(tmp_path):
    (tmp_path / "logs").mkdir()
    write_table(tmp_path / "logs" / "a.csv", GOOD)
    second = write_table(tmp_path / "logs" / "b.csv", {k: v[:1] for k, v in GOOD.items()})
    error = prepare_error(write_spec(tmp_path, "logs/*.csv"))
    assert_names(error, second, None, 1)
    assert str(tmp_path / "logs" / "a.csv") in str(error)


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicated_id_in_the_users_table(tmp_path, fmt):
    events = write_table(tmp_path / "events.parquet", GOOD)
    users = write_table(tmp_path / f"users.{fmt}", {"user_id": ["a", "b", "c", "b"], "tier": ["x", "y", "z", "w"]})
    spec = write_spec(tmp_path, events.name, extra="")
    spec.write_text(spec.read_text() + f'\n[users]\npath = "{users.name}"\nid = "user_id"\n\n'
                    '[[user_fields]]\nname = "tier"\n')
    error = prepare_error(spec)
    assert_names(error, users, "user_id", 4)
    assert "'b'" in str(error) and "first at row 2" in str(error)


def test_a_string_in_a_numeric_field(tmp_path):
    events = write_table(tmp_path / "events.parquet", GOOD)
    users = write_table(tmp_path / "users.csv", {"user_id": ["a", "b"], "age": ["31", "old"]})
    spec = write_spec(tmp_path, events.name)
    spec.write_text(spec.read_text() + f'\n[users]\npath = "{users.name}"\nid = "user_id"\n\n'
                    '[[user_fields]]\nname = "age"\nkind = "numeric"\nbuckets = [18, 30]\n')
    error = prepare_error(spec)
    assert_names(error, users, "age", 2)
    assert "'old'" in str(error)


# --- invalid specs ---------------------------------------------------------------------------------------
def spec_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert str(path) in message
    return message


EVENTS = '[events]\npath = "e.parquet"\nlabel = { click = "click" }\n'


def test_spec_unknown_key(tmp_path):
    message = spec_error(tmp_path, f'name = "s"\n{EVENTS}colour = "red"\n')
    assert "events.colour" in message and "Extra inputs" in message


def test_spec_unknown_top_level_key(tmp_path):
    assert "lables" in spec_error(tmp_path, f'name = "s"\nlables = 1\n{EVENTS}')


def test_spec_numeric_field_without_buckets(tmp_path):
    message = spec_error(tmp_path, f'name = "s"\n{EVENTS}\n[[user_fields]]\nname = "age"\nkind = "numeric"\n')
    assert "user_fields.0" in message and "'age'" in message and "buckets" in message


def test_spec_both_click_and_rating(tmp_path):
    text = 'name = "s"\n[events]\npath = "e.parquet"\nlabel = { click = "c", rating = "r", threshold = 3 }\n'
    message = spec_error(tmp_path, text)
    assert "events.label" in message and "either `click`" in message


def test_spec_not_toml(tmp_path):
    assert "not valid TOML" in spec_error(tmp_path, 'name = "s\n')


def test_spec_file_missing(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.toml")
