"""`udg data inspect | make-shop | schema | fetch` (dataset/commands.py), through an argparse harness."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dataset import commands
from dataset.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "docs" / "dataset-spec.schema.json"


def udg_data(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="udg")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *argv])
    return int(args.handler(args) or 0)


def test_committed_json_schema_is_what_the_command_writes(tmp_path):
    out = tmp_path / "schema.json"
    assert udg_data("schema", "--out", str(out)) == 0
    assert out.read_text() == SCHEMA_FILE.read_text(), "regenerate: udg data schema --out docs/dataset-spec.schema.json"
    schema = json.loads(out.read_text())
    assert schema["title"] == "UDG dataset spec" and "base_dir" not in schema["properties"]


def test_schema_to_stdout(capsys):
    assert udg_data("schema") == 0
    assert json.loads(capsys.readouterr().out) == json.loads(SCHEMA_FILE.read_text())


def test_make_shop_writes_parquet_and_a_relocatable_spec(tmp_path, capsys, monkeypatch):
    out = tmp_path / "made"
    assert udg_data("make-shop", "--out", str(out), "--users", "200", "--items", "60", "--new-items", "4",
                    "--seed", "5") == 0
    printed = capsys.readouterr().out
    assert "click rate" in printed and "shop.toml" in printed
    assert {p.name for p in out.iterdir()} == {"events.parquet", "users.parquet", "items.parquet", "shop.toml"}
    text = (out / "shop.toml").read_text()
    assert "generator" not in text.split("name =")[1] and 'path = "events.parquet"' in text
    assert "users=200" in text and "seed=5" in text

    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    monkeypatch.chdir(tmp_path)
    report = commands.inspect_spec(load_spec(moved / "shop.toml"))
    assert report["events"]["users"] == 200
    assert report["coverage"]["items"]["table_only"] == 4  # the new catalogue items
    assert list(report["user_fields"]) == ["country", "device", "tier", "age_band"]


def test_make_shop_rejects_bad_parameters(tmp_path):
    with pytest.raises(SystemExit, match="min_events"):
        udg_data("make-shop", "--out", str(tmp_path / "x"), "--min-events", "0")


def write_log(folder: Path) -> Path:
    """A small CSV log with one duplicate, an item table missing an item and holding an extra one."""
    (folder / "events.csv").write_text(
        "user,item,ts,click\n"
        + "".join(f"u{u},i{(u + t) % 5},{t},{int((u * t) % 3 == 0)}\n" for u in range(6) for t in range(1, 9))
        + "u0,i1,1,0\n")  # repeats u0's first event (u0, i1, 1)
    (folder / "items.csv").write_text("item_id,genre\n" + "".join(f"i{k},g{k % 2}\n" for k in [0, 1, 2, 3, 9]))
    spec = folder / "log.toml"
    spec.write_text('name = "mine"\n[events]\npath = "events.csv"\nuser = "user"\nitem = "item"\ntimestamp = "ts"\n'
                    'label = { click = "click" }\n[items]\npath = "items.csv"\nid = "item_id"\n'
                    '[[item_fields]]\nname = "genre"\n[split]\ncold_user_frac = 0.2\n'
                    "[vocabulary]\nhash_buckets = 8\n")
    return spec


def test_inspect_reports_what_the_model_will_see(tmp_path, capsys):
    spec = write_log(tmp_path)
    assert udg_data("inspect", "--spec", str(spec), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    events = report["events"]
    assert events["rows"] == 49 and events["users"] == 6 and events["items"] == 5
    assert events["duplicates"]["rows"] == 1
    assert events["duplicates"]["first"] == {"file": str(tmp_path / "events.csv"), "row": 49}
    assert report["notes"] and "row 49" in report["notes"][0]
    assert report["prepared_events"] == 48  # the statistics drop the duplicate
    assert events["events_per_user"]["min"] == 8 and events["events_per_user"]["max"] == 9
    assert 0 < events["label_rate"] < 1
    split = report["split"]
    assert sum(split[name]["events"] for name in ("train", "valid", "test", "cold")) == 48
    assert report["cold_users"]["users"] == 1 and report["cold_users"]["share"] == round(1 / 6, 4)
    assert report["ids"]["users"]["oov"]["cold"] == 0.0 and report["ids"]["users"]["hashed"]["cold"] == 1.0
    assert report["ids"]["items"]["hash_buckets"] == 8
    coverage = report["coverage"]["items"]
    assert coverage == {"table_rows": 5, "log_ids_in_table": 0.8, "events_covered": coverage["events_covered"],
                        "log_ids_missing": 1, "table_only": 1}
    assert report["coverage"]["users"] is None
    assert report["item_fields"]["genre"]["vocab"] == 2
    assert set(report["timings"]) == {"materialise_s", "read_s", "tables_s", "prepare_s", "total_s"}


def test_inspect_text_report(tmp_path, capsys):
    assert udg_data("inspect", "--spec", str(write_log(tmp_path))) == 0
    text = capsys.readouterr().out
    for expected in ("events per user: min 8", "duplicates", "cold users held out", "items table: 5 ids",
                     "genre", "timings:", "note:"):
        assert expected in text, expected


def test_inspect_stops_on_bad_data_with_the_row(tmp_path):
    spec = write_log(tmp_path)
    (tmp_path / "events.csv").write_text("user,item,ts,click\nu0,i1,1,1\nu0,i2,2,7\n")
    with pytest.raises(SystemExit, match=r"events\.csv: column 'click', row 2: a click label must be 0 or 1"):
        udg_data("inspect", "--spec", str(spec))


def test_inspect_a_bad_spec(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('name = "s"\n[events]\npath = "e.csv"\nlabel = { click = "c" }\nbogus = 1\n')
    with pytest.raises(SystemExit, match="events.bogus"):
        udg_data("inspect", "--spec", str(spec))


def test_inspect_is_torch_free(tmp_path):
    spec = write_log(tmp_path)
    code = ("import sys; sys.modules['torch'] = None; from tests.dataset.test_dataset_commands import udg_data; "
            f"sys.exit(udg_data('inspect', '--spec', {str(spec)!r}, '--json'))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["spec"] == "mine"


def test_fetch_reports_sha256_status(tmp_path, monkeypatch, capsys):
    import dataset.sources
    from dataset.movielens import ML100K_SHA256

    for name in ML100K_SHA256:
        (tmp_path / name).write_text("not the real file\n")
    monkeypatch.setattr(dataset.sources, "materialise", lambda spec: tmp_path)
    assert udg_data("fetch") == 1
    out = capsys.readouterr().out
    assert out.count("MISMATCH") == 3 and str(tmp_path / "ml-100k.inter") in out
