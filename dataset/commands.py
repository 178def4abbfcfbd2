"""`udg data inspect | make-shop | schema | fetch` — the dataset side of the command line (torch-free).

`inspect` is the first command to run on your own click log: it reads and validates the spec's files (a
bad file stops it with the file, column and row), then prepares them as training would and reports what
the model will see: vocabularies and how much falls out of them, the label rate, events per user, the
split, the cold users, how well the item and user tables cover the log, duplicates, and the time taken.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

QUANTILES = {"min": 0.0, "p10": 0.1, "p50": 0.5, "p90": 0.9, "max": 1.0}


# --- inspect ---------------------------------------------------------------------------------------------
def _share(mask: np.ndarray) -> float:
    return round(float(np.mean(mask)), 4) if len(mask) else 0.0


def _quantiles(values: np.ndarray) -> dict:
    if not len(values):
        return {key: 0 for key in QUANTILES}
    return {key: float(np.quantile(values, q, method="lower")) for key, q in QUANTILES.items()}


def _iso(seconds: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(int(seconds), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _raw_events(spec) -> dict:
    """Statistics of the log as the files hold it (before deduplication and splits)."""
    from dataset.ingest import _where, read_events, sorted_codes

    events = read_events(spec)
    user_code, user_ids = sorted_codes(events.users)
    item_code, item_ids = sorted_codes(events.items)
    ts = events.timestamps
    n = len(ts)
    order = _key_order(user_code, item_code, ts)  # stable: file order inside each (user, item, ts)
    same = (user_code[order][1:] == user_code[order][:-1]) & (item_code[order][1:] == item_code[order][:-1]) & \
        (ts[order][1:] == ts[order][:-1])
    duplicates = {"rows": int(same.sum()), "policy": spec.events.duplicates}
    if same.any():
        file, row = _where(events.origin, int(order[1:][same].min()))
        duplicates["first"] = {"file": str(file), "row": int(row)}
    per_user = np.bincount(user_code)
    return {"rows": int(n), "users": int(len(per_user)), "items": int(len(item_ids)),
            "label_rate": round(float(events.labels.mean()), 4) if n else 0.0,
            "click_rate": round(float(events.clicks.mean()), 4) if n else 0.0,
            "first": _iso(ts.min()) if n else None, "last": _iso(ts.max()) if n else None,
            "events_per_user": _quantiles(per_user), "duplicates": duplicates,
            "_users": user_ids, "_items": item_ids, "_item_code": item_code,
            "_user_code": user_code}


def _key_order(user_code: np.ndarray, item_code: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """A stable order by (user, item, timestamp): one int64 sort when the three fit in 63 bits."""
    if not len(ts):
        return np.zeros(0, np.int64)
    span = int(ts.max()) - int(ts.min()) + 1
    items = int(item_code.max()) + 1
    users = int(user_code.max()) + 1
    if users * items * span < 2 ** 63:
        key = (user_code * items + item_code) * span + (ts - ts.min())
        return np.argsort(key, kind="stable")
    return np.lexsort((ts, item_code, user_code))


def _table_ids(spec, table, what: str) -> np.ndarray:
    from dataset.ingest import _ids, _read_file, files_of

    parts = []
    for file in files_of(spec, table, what):
        data = _read_file(file, table, [table.id], {table.id})
        parts.append(np.asarray(_ids(file, data, table.id).to_numpy(zero_copy_only=False)).astype(str))
    return np.concatenate(parts) if parts else np.zeros(0, str)


def _coverage(spec, table, what: str, log_ids: np.ndarray, codes: np.ndarray) -> dict | None:
    """How well a user or item table covers the ids of the log."""
    if table is None:
        return None
    ids = np.unique(_table_ids(spec, table, what))
    found = np.isin(log_ids, ids)
    return {"table_rows": int(len(ids)), "log_ids_in_table": _share(found), "events_covered": _share(found[codes]),
            "log_ids_missing": int((~found).sum()), "table_only": int((~np.isin(ids, log_ids)).sum())}


def _id_stats(vocab, distinct: int, splits: dict, attribute: str) -> dict:
    known = vocab.known_size
    out = {"distinct": distinct, "vocab": known - 2, "hash_buckets": vocab.hash_buckets, "oov": {}, "hashed": {}}
    for name, samples in splits.items():
        index = getattr(samples, attribute)
        out["oov"][name] = _share(index == 1)
        out["hashed"][name] = _share(index >= known)
    return out


def _field_stats(prepared) -> dict:
    schema = prepared.schema
    users_all = prepared.splits["train"].profiles  # [users, fields]: per user number
    out = {"user_fields": {}, "item_fields": {}}
    for k, field in enumerate(schema.user_fields):
        column = users_all[:, k]
        out["user_fields"][field.name] = {
            "kind": field.kind, "vocab": field.vocab.known_size - 2, "hash_buckets": field.vocab.hash_buckets,
            "oov_users": _share(column == 1), "hashed_users": _share(column >= field.vocab.known_size)}
    rows = slice(2, schema.items.known_size)  # the items with a row of their own
    for field in schema.item_fields:
        table = schema.item_table[field.name][rows]
        filled = table != 0
        tokens = table[filled]
        out["item_fields"][field.name] = {
            "kind": field.kind, "vocab": field.vocab.known_size - 2, "hash_buckets": field.vocab.hash_buckets,
            "width": field.width, "missing_items": _share(~filled.any(axis=1)) if len(table) else 0.0,
            "oov_tokens": _share(tokens == 1), "hashed_tokens": _share(tokens >= field.vocab.known_size),
            "tokens_per_item": round(float(filled.sum(axis=1).mean()), 3) if len(table) else 0.0}
    return out


def inspect_spec(spec) -> dict:
    """Everything `udg data inspect` reports, as a JSON-able dict. Raises DataError on bad data."""
    from dataset.ingest import prepare
    from dataset.sources import materialise

    timings = {}
    started = time.perf_counter()
    materialise(spec)
    timings["materialise_s"] = time.perf_counter() - started
    mark = time.perf_counter()
    raw = _raw_events(spec)
    timings["read_s"] = time.perf_counter() - mark
    notes = []
    prepared_spec = spec
    if raw["duplicates"]["rows"] and spec.events.duplicates == "error":
        first = raw["duplicates"]["first"]
        notes.append(f"{first['file']}: row {first['row']}: a duplicate (user, item, timestamp) event; with "
                     "events.duplicates = \"error\" training stops there. The statistics below drop duplicates "
                     "(events.duplicates = \"drop\").")
        prepared_spec = spec.with_overrides(**{"events.duplicates": "drop"})
    mark = time.perf_counter()
    coverage = {"items": _coverage(spec, spec.items, "items", raw["_items"], raw["_item_code"]),
                "users": _coverage(spec, spec.users, "users", raw["_users"], raw["_user_code"])}
    timings["tables_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    prepared = prepare(prepared_spec)
    timings["prepare_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started
    splits = prepared.splits
    n_users = len(prepared.user_ids)
    cold_users = len(np.unique(splits["cold"].user_key))
    split_stats = {name: {"events": len(s), "users": int(len(np.unique(s.user_key))),
                          "label_rate": round(float(s.label.mean()), 4) if len(s) else None}
                   for name, s in splits.items()}
    schema = prepared.schema
    report = {
        "spec": spec.name,
        "events": {key: value for key, value in raw.items() if not key.startswith("_")},
        "prepared_events": int(sum(len(s) for s in splits.values())),
        "split": {"kind": spec.split.kind, **split_stats},
        "cold_users": {"users": cold_users, "share": round(cold_users / n_users, 4) if n_users else 0.0,
                       "events_share": round(len(splits["cold"]) / max(1, sum(len(s) for s in splits.values())), 4)},
        "ids": {"users": _id_stats(schema.users, n_users, splits, "user"),
                "items": _id_stats(schema.items, prepared.stats.get("items", 0), splits, "item")},
        **_field_stats(prepared),
        "coverage": coverage,
        "known_users": len(prepared.known_users),
        "max_history": schema.max_history,
        "timings": {key: round(value, 3) for key, value in timings.items()},
        "notes": notes,
    }
    return report


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_report(report: dict) -> str:
    lines = [f"dataset {report['spec']}"]
    ev = report["events"]
    lines.append(f"  events: {ev['rows']:,} rows, {ev['users']:,} users, {ev['items']:,} items, "
                 f"{ev['first']} .. {ev['last']}")
    lines.append(f"  label rate {_pct(ev['label_rate'])}, behavior clicks {_pct(ev['click_rate'])}")
    q = ev["events_per_user"]
    lines.append("  events per user: " + ", ".join(f"{k} {v:g}" for k, v in q.items()))
    dup = ev["duplicates"]
    where = f" (first: {dup['first']['file']} row {dup['first']['row']})" if dup.get("first") else ""
    lines.append(f"  duplicates (user, item, timestamp): {dup['rows']:,} rows{where}; policy {dup['policy']!r}")
    split = report["split"]
    lines.append(f"split ({split['kind']}):")
    for name in ("train", "valid", "test", "cold"):
        s = split[name]
        lines.append(f"  {name:<6}{s['events']:>12,} events {s['users']:>9,} users  label rate {_pct(s['label_rate'])}")
    cold = report["cold_users"]
    lines.append(f"  cold users held out: {cold['users']:,} ({_pct(cold['share'])} of users, "
                 f"{_pct(cold['events_share'])} of events)")
    lines.append("ids (oov / hashed share per split):")
    for side, stats in report["ids"].items():
        shares = ", ".join(f"{name} {_pct(stats['oov'][name])}/{_pct(stats['hashed'][name])}"
                           for name in ("train", "valid", "test", "cold"))
        lines.append(f"  {side}: {stats['distinct']:,} distinct, {stats['vocab']:,} in the vocabulary + "
                     f"{stats['hash_buckets']} hash buckets; {shares}")
    lines.append("user fields (share of users out of vocabulary / hashed):")
    for name, s in report["user_fields"].items():
        lines.append(f"  {name:<16}{s['kind']:<12}{s['vocab']:>7,} tokens +{s['hash_buckets']} hashed  "
                     f"oov {_pct(s['oov_users'])}, hashed {_pct(s['hashed_users'])}")
    lines.append("item fields (items of the vocabulary):")
    for name, s in report["item_fields"].items():
        lines.append(f"  {name:<16}{s['kind']:<12}{s['vocab']:>7,} tokens +{s['hash_buckets']} hashed  "
                     f"width {s['width']}, {s['tokens_per_item']:g} per item, missing {_pct(s['missing_items'])}, "
                     f"oov {_pct(s['oov_tokens'])}, hashed {_pct(s['hashed_tokens'])}")
    for side, c in report["coverage"].items():
        if c is None:
            lines.append(f"{side} table: none (fields from event columns)")
            continue
        lines.append(f"{side} table: {c['table_rows']:,} ids; {_pct(c['log_ids_in_table'])} of the log's {side} "
                     f"({_pct(c['events_covered'])} of events) found, {c['log_ids_missing']:,} missing, "
                     f"{c['table_only']:,} only in the table")
    lines.append(f"known users (feature store): {report['known_users']:,}; history cap {report['max_history']}")
    lines.append("timings: " + ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in report["timings"].items()))
    lines.extend(f"note: {note}" for note in report["notes"])
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    from dataset.spec import load_spec

    report = inspect_spec(load_spec(args.spec))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# --- make-shop -------------------------------------------------------------------------------------------
def shop_spec_text(params) -> str:
    """The built-in shop spec for files beside it: no generator, paths relative to the spec's folder."""
    from dataset.spec import BUILTIN_DIR

    lines = []
    for line in (BUILTIN_DIR / "shop.toml").read_text().splitlines():
        if line.startswith("#"):
            continue
        if line.startswith("generator ="):
            continue
        lines.append(line.replace("{source}/", ""))
    import textwrap

    settings = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(params).items())
    header = ["# The shop click log in this folder, written by `udg data make-shop` (dataset/shop.py) with",
              *textwrap.wrap(settings + ".", width=110, initial_indent="# ", subsequent_indent="# "),
              "# Paths are relative to this file: `--spec <this folder>/shop.toml` works from anywhere."]
    return "\n".join([*header, *lines]).rstrip("\n") + "\n"


def make_shop(out: Path, params) -> dict:
    from dataset.files import write_atomically
    from dataset.shop import TABLES, generate, new_item_ids, write_parquet
    from dataset.spec import load_spec

    out = Path(out)
    started = time.perf_counter()
    tables = generate(params)
    write_parquet(tables, out)
    spec_path = out / "shop.toml"
    write_atomically(spec_path, lambda tmp: tmp.write_text(shop_spec_text(params)))
    load_spec(spec_path)  # the written spec validates
    clicks = tables["events"]["click"]
    return {"folder": str(out), "spec": str(spec_path),
            "files": {name: (out / f"{name}.parquet").stat().st_size for name in TABLES},
            "events": int(len(clicks)), "users": params.users, "items": params.items + params.new_items,
            "new_items": new_item_ids(params), "click_rate": round(float(clicks.mean()), 4) if len(clicks) else 0.0,
            "seconds": round(time.perf_counter() - started, 3)}


def cmd_make_shop(args: argparse.Namespace) -> int:
    from dataset.shop import ShopParams

    params = ShopParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ShopParams)})
    try:
        made = make_shop(Path(args.out), params)
    except ValueError as error:
        raise SystemExit(f"udg data make-shop: {error}") from None
    print(f"wrote {made['events']:,} events ({made['users']:,} users, {made['items']:,} items of which "
          f"{len(made['new_items'])} in no event; click rate {100 * made['click_rate']:.1f}%) "
          f"in {made['seconds']:.2f}s")
    for name, size in made["files"].items():
        print(f"  {made['folder']}/{name}.parquet  {size:,} bytes")
    print(f"  {made['spec']}  (udg data inspect --spec {made['spec']})")
    return 0


# --- schema ----------------------------------------------------------------------------------------------
def schema_text() -> str:
    from dataset.spec import json_schema

    return json.dumps(json_schema(), indent=2) + "\n"


def cmd_schema(args: argparse.Namespace) -> int:
    text = schema_text()
    if args.out in (None, "-"):
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


# --- fetch -----------------------------------------------------------------------------------------------
def fetch_movielens() -> list[dict]:
    """Fetch (or find) MovieLens-100K in the cache; per file its path, size, sha256 and whether it matches."""
    from dataset.movielens import ML100K_SHA256
    from dataset.sources import materialise
    from dataset.spec import load_spec

    folder = Path(materialise(load_spec("movielens-100k")))
    rows = []
    for name, expected in ML100K_SHA256.items():
        path = folder / name
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        rows.append({"file": str(path), "bytes": path.stat().st_size, "sha256": digest, "ok": digest == expected})
    return rows


def cmd_fetch(args: argparse.Namespace) -> int:
    rows = fetch_movielens()
    for row in rows:
        print(f"{row['file']}  {row['bytes']:,} bytes  sha256 {row['sha256'][:16]}…  "
              f"{'ok' if row['ok'] else 'MISMATCH'}")
    return 0 if all(row["ok"] for row in rows) else 1


# --- registration ----------------------------------------------------------------------------------------
def _guarded(handler):
    """Spec and data errors end the command with their message (file, column, row), not a traceback."""
    def run(args: argparse.Namespace) -> int:
        from dataset.errors import DataError
        from dataset.spec import SpecError

        try:
            return handler(args)
        except (DataError, SpecError) as error:
            raise SystemExit(f"udg data {args.data_command}: {error}") from None

    return run


def _add_shop_options(parser: argparse.ArgumentParser) -> None:
    from dataset.shop import ShopParams

    group = parser.add_argument_group("shop parameters")
    for f in dataclasses.fields(ShopParams):
        default = f.default
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(default), default=default,
                           metavar=type(default).__name__.upper(), help=f"(default: {default})")


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="inspect a dataset spec, make the shop log, write the spec schema, "
                                              "fetch MovieLens-100K")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    inspect = commands.add_parser("inspect", help="validate a spec's files and report vocabularies, splits, "
                                                  "coverage, duplicates and timings")
    inspect.add_argument("--spec", required=True, help="a built-in spec name or a TOML/YAML spec file")
    inspect.add_argument("--json", action="store_true", help="the report as JSON")
    inspect.set_defaults(handler=_guarded(cmd_inspect))

    shop = commands.add_parser("make-shop", help="write the synthetic shop log (Parquet) and its spec DIR/shop.toml")
    shop.add_argument("--out", required=True, help="the folder to write")
    _add_shop_options(shop)
    shop.set_defaults(handler=_guarded(cmd_make_shop))

    schema = commands.add_parser("schema", help="write the JSON Schema of dataset specs")
    schema.add_argument("--out", default=None, help="the file to write (default: stdout); the repository keeps "
                                                    "docs/dataset-spec.schema.json")
    schema.set_defaults(handler=_guarded(cmd_schema))

    fetch = commands.add_parser("fetch", help="fetch MovieLens-100K into the cache and verify its sha256")
    fetch.set_defaults(handler=_guarded(cmd_fetch))
