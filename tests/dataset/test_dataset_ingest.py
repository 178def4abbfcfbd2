"""Ingestion on tiny hand-written logs: leak-free histories, splits, cold users, vocabulary policy, field
encodings (numeric buckets, multi-valued, event-column fields), the feature-store snapshot; the shop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dataset.ingest import prepare
from dataset.schema import OOV, PAD, Vocab, stable_hash
from dataset.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]


def write_parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: pa.array(v) for k, v in columns.items()}), path)
    return path


def events_table(rows: list[tuple]) -> dict:
    """(user, item, timestamp, click[, extra columns…]) rows -> columns."""
    users, items, stamps, clicks = (list(c) for c in zip(*[r[:4] for r in rows], strict=True))
    return {"user_id": users, "item_id": items, "timestamp": stamps, "click": clicks}


def make(tmp_path: Path, rows: list[tuple] | dict, body: str = "", users: dict | None = None,
         items: dict | None = None, users_csv: str | None = None, items_csv: str | None = None):
    columns = rows if isinstance(rows, dict) else events_table(rows)
    write_parquet(tmp_path / "events.parquet", columns)
    text = 'name = "tiny"\n[events]\npath = "events.parquet"\nlabel = { click = "click" }\n'
    if users is not None:
        write_parquet(tmp_path / "users.parquet", users)
        text += '[users]\npath = "users.parquet"\nid = "user_id"\n'
    if users_csv is not None:
        (tmp_path / "users.csv").write_text(users_csv)
        text += '[users]\npath = "users.csv"\nid = "user_id"\n'
    if items is not None:
        write_parquet(tmp_path / "items.parquet", items)
        text += '[items]\npath = "items.parquet"\nid = "item_id"\n'
    if items_csv is not None:
        (tmp_path / "items.csv").write_text(items_csv)
        text += '[items]\npath = "items.csv"\nid = "item_id"\n'
    (tmp_path / "spec.toml").write_text(text + body)
    return prepare(load_spec(tmp_path / "spec.toml"))


def item_tokens(prepared, indices) -> list[str]:
    tokens = prepared.schema.items.tokens
    return [tokens[i] for i in np.asarray(indices).tolist() if i != PAD]


def histories(prepared, split: str = "train") -> list[list[str]]:
    samples = prepared.splits[split]
    return [item_tokens(prepared, row) for row in samples.histories.gather()]


def split_positions(prepared) -> dict[str, dict[str, list[int]]]:
    """Per split, per raw user id, the positions of its events in the user's timeline. Needs logs where every
    event is a click with its own timestamp: then an event's history length is its position."""
    out = {}
    for name, samples in prepared.splits.items():
        per_user: dict[str, list[int]] = {}
        for key, length in zip(samples.user_key.tolist(), samples.histories.length.tolist(), strict=True):
            per_user.setdefault(str(prepared.user_ids[key]), []).append(length)
        if per_user:
            out[name] = per_user
    return out


NO_SPLIT = "[split]\nvalid_frac = 0\ntest_frac = 0\n"


# --- behavior histories ----------------------------------------------------------------------------------
def test_history_holds_clicks_strictly_before_most_recent_first_capped(tmp_path):
    rows = [("a", "i6", 5, 1), ("a", "i1", 1, 1), ("a", "i2", 2, 1), ("a", "i3", 2, 1), ("a", "i4", 3, 0),
            ("a", "i5", 4, 1)]  # the file is not in time order; i2 and i3 share a timestamp
    prepared = make(tmp_path, rows, NO_SPLIT + "[behavior]\nmax_length = 3\n")
    train = prepared.splits["train"]
    assert item_tokens(prepared, train.item) == ["i1", "i2", "i3", "i4", "i5", "i6"]  # time order, ties: file order
    assert histories(prepared) == [
        [],  # nothing before the first event
        ["i1"],  # i3 has the same timestamp: never visible
        ["i1"],  # nor i2 to i3
        ["i3", "i2", "i1"],  # most recent first (ties in file order)
        ["i3", "i2", "i1"],  # i4 was not clicked
        ["i5", "i3", "i2"],  # capped at max_length, the oldest dropped
    ]


def test_history_never_includes_the_event_itself_or_other_users(tmp_path):
    rows = [("a", "x", 1, 1), ("b", "y", 2, 1), ("a", "z", 3, 1), ("b", "x", 1, 1)]
    prepared = make(tmp_path, rows, NO_SPLIT)
    assert histories(prepared) == [[], ["x"], [], ["x"]]  # a: x, z; b: x, y


def test_click_rule_from_another_column(tmp_path):
    columns = events_table([("a", "x", 1, 0), ("a", "y", 2, 0), ("a", "z", 3, 1)])
    columns["action"] = ["view", "cart", "view"]
    prepared = make(tmp_path, columns, NO_SPLIT + '[behavior]\nclicks = { column = "action", values = ["cart"] }\n')
    assert histories(prepared) == [[], [], ["y"]]


# --- splits ----------------------------------------------------------------------------------------------
def test_per_user_time_split_takes_each_users_last_events(tmp_path):
    rows = [("a", f"i{t}", t, 1) for t in range(10, 0, -1)]  # written newest first
    rows += [("b", f"j{t}", 100 + t, 1) for t in range(1, 6)]
    rows += [("c", "k1", 1, 1), ("c", "k2", 2, 1)]  # fewer than 3 events: all training
    prepared = make(tmp_path, rows, "[split]\nvalid_frac = 0.2\ntest_frac = 0.2\n")
    assert split_positions(prepared) == {
        "train": {"a": [0, 1, 2, 3, 4, 5], "b": [0, 1, 2], "c": [0, 1]},
        "valid": {"a": [6, 7], "b": [3]},
        "test": {"a": [8, 9], "b": [4]},
    }
    assert prepared.stats["splits"] == {"train": 11, "valid": 3, "test": 3, "cold": 0}
    assert not prepared.schema.items.known("i10") and prepared.schema.items.known("i6")  # vocab: training only


def test_per_user_time_split_rounds_the_fractions(tmp_path):
    rows = [("a", f"i{t}", t, 1) for t in range(20)]
    prepared = make(tmp_path, rows, "[split]\nvalid_frac = 0.1\ntest_frac = 0.1\n")
    assert split_positions(prepared) == {"train": {"a": list(range(16))}, "valid": {"a": [16, 17]},
                                         "test": {"a": [18, 19]}}


def test_rating_labels_and_items_unseen_in_training(tmp_path):
    """label = rating > threshold; an item first seen in validation or test has no row of its own (OOV)."""
    events = "user_id,item_id,rating,timestamp\n"
    events += "".join(f"u1,i{k},{5.0 if k % 2 else 1.0},{k}\n" for k in range(10))
    events += "u2,i0,4.0,1\nu2,i1,2.0,2\nu2,i9,3.0,3\n"
    (tmp_path / "events.csv").write_text(events)
    (tmp_path / "spec.toml").write_text('name = "ratings"\n[events]\npath = "events.csv"\n'
                                        "label = { rating = \"rating\", threshold = 3.0 }\n")
    prepared = prepare(load_spec(tmp_path / "spec.toml"))
    train, test = prepared.splits["train"], prepared.splits["test"]
    assert train.label.dtype == np.float32 and set(np.unique(train.label)) <= {0.0, 1.0}
    assert train.label[:4].tolist() == [0.0, 1.0, 0.0, 1.0]  # u1: 1, 5, 1, 5 -> rating > 3 is a click
    assert prepared.splits["test"].label.tolist() == [1.0, 0.0]  # u1's i9 (5.0), u2's i9 (3.0: not above 3)
    assert len(test) == 2
    assert not prepared.schema.items.known("i9") and (test.item == OOV).all()  # i9 is never a training event
    assert test.history.max() < len(prepared.schema.items)  # histories hold vocabulary rows or PAD


def test_a_test_event_sees_the_clicks_of_train_and_valid(tmp_path):
    rows = [("a", "i1", 1, 1), ("a", "i2", 2, 1), ("a", "i3", 3, 1), ("a", "i1", 4, 1), ("a", "i2", 5, 1)]
    prepared = make(tmp_path, rows, "[split]\nvalid_frac = 0.2\ntest_frac = 0.2\n")
    assert histories(prepared, "valid") == [["i3", "i2", "i1"]]
    assert histories(prepared, "test") == [["i1", "i3", "i2", "i1"]]  # the valid event's click included


def test_global_time_split(tmp_path):
    rows = [("a", "x", 5, 1), ("a", "y", 10, 1), ("b", "z", 19, 1), ("b", "x", 20, 1), ("c", "y", 30, 1)]
    prepared = make(tmp_path, rows, '[split]\nkind = "global_time"\nvalid_from = 10\ntest_from = 20\n')
    assert split_positions(prepared) == {"train": {"a": [0]}, "valid": {"a": [1], "b": [0]},
                                         "test": {"b": [1], "c": [0]}}
    # vocabularies come from training only: b and c never train, y and z are unseen items
    schema = prepared.schema
    assert schema.users.known("a") and not schema.users.known("b") and not schema.users.known("c")
    assert schema.items.known("x") and not schema.items.known("y") and not schema.items.known("z")


def test_global_time_split_with_iso_timestamps_and_cutoffs(tmp_path):
    columns = {"user_id": ["a", "a", "a"], "item_id": ["x", "y", "z"], "click": [1, 0, 1],
               "timestamp": ["2024-01-01T00:00:00", "2024-02-01T00:00:00", "2024-03-01T12:00:00"]}
    prepared = make(tmp_path, columns, '[split]\nkind = "global_time"\nvalid_from = "2024-02-01"\n'
                                       'test_from = "2024-03-01T00:00:00"\n')
    assert {name: len(s) for name, s in prepared.splits.items()} == {"train": 1, "valid": 1, "test": 1, "cold": 0}


def test_cold_users_are_held_out_and_absent_from_the_vocabularies(tmp_path):
    rows, tiers = [], []
    for u in range(10):
        rows += [(f"u{u}", "shared", 1, 1), (f"u{u}", f"own{u}", 2, 1), (f"u{u}", "shared2", 3, 0)]
        tiers.append(f"tier{u}")
    users = {"user_id": [f"u{u}" for u in range(10)], "tier": tiers}
    prepared = make(tmp_path, rows, "[split]\nvalid_frac = 0\ntest_frac = 0\ncold_user_frac = 0.3\nseed = 1\n"
                    '[[user_fields]]\nname = "tier"\n', users=users)
    cold_keys = np.unique(prepared.splits["cold"].user_key)
    cold = {str(prepared.user_ids[k]) for k in cold_keys}
    assert len(cold) == 3
    assert len(prepared.splits["cold"]) == 9  # all their events
    for name in ("train", "valid", "test"):
        assert not cold & {str(prepared.user_ids[k]) for k in prepared.splits[name].user_key}
    schema = prepared.schema
    tier = schema.user_field("tier").vocab
    for user in cold:
        number = user[1:]
        assert not schema.users.known(user)
        assert not schema.items.known(f"own{number}")  # only cold users' events mention it
        assert not tier.known(f"tier{number}")  # only a cold user holds it
    assert schema.items.known("shared") and len(schema.users) == 2 + 7
    assert set(prepared.known_users.user_ids.tolist()) == {f"u{u}" for u in range(10)} - cold
    assert (prepared.splits["cold"].user == OOV).all()


# --- vocabulary policy -----------------------------------------------------------------------------------
def test_vocab_reserves_pad_and_oov():
    vocab = Vocab(["b", "a", "a"])
    assert vocab.tokens[:2] == ["<pad>", "<oov>"] and PAD == 0 and OOV == 1
    assert vocab.lookup("a") == 2 and vocab.lookup("b") == 3 and len(vocab) == 4
    assert vocab.lookup("never seen") == OOV and not vocab.known("never seen") and not vocab.known("<oov>")
    assert vocab.lookup_many(["b", "zz"]).tolist() == [3, OOV]
    assert Vocab.from_json(vocab.to_json()).index == vocab.index
    hashed = Vocab(["a"], hash_buckets=5)
    again = Vocab.from_json(hashed.to_json())
    assert again.index == hashed.index and again.lookup("zz") == hashed.lookup("zz") >= hashed.known_size


def test_min_count_sends_a_rare_id_to_a_hash_bucket_row(tmp_path):
    rows = [("a", "pop", t, 1) for t in range(1, 4)] + [("b", "pop", 1, 0), ("b", "rare", 2, 1)]
    prepared = make(tmp_path, rows, NO_SPLIT + "[vocabulary]\nmin_count = 2\nhash_buckets = 4\n")
    items = prepared.schema.items
    assert items.tokens == ["<pad>", "<oov>", "pop"] and len(items) == 3 + 4
    expected = items.known_size + stable_hash("rare") % 4
    assert items.lookup("rare") == expected
    train = prepared.splits["train"]
    assert item_tokens(prepared, train.item[train.item < items.known_size]) == ["pop"] * 4
    assert train.item[-1] == expected  # b's "rare" event uses the bucket row
    assert prepared.schema.users.known("a") and prepared.schema.users.known("b")


def test_hash_buckets_are_the_same_in_every_process(tmp_path):
    code = ("from dataset.schema import Vocab; v = Vocab(['pop'], hash_buckets=97); "
            "print([v.lookup(t) for t in ('rare', 'other', 'ü-ñ')])")
    results = set()
    for seed in ("1", "2", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        results.add(out.stdout.strip())
    here = Vocab(["pop"], hash_buckets=97)
    assert results == {str([here.lookup(t) for t in ("rare", "other", "ü-ñ")])}


def test_without_hash_buckets_rare_ids_share_the_oov_row(tmp_path):
    rows = [("a", "pop", 1, 1), ("a", "pop", 2, 1), ("a", "rare", 3, 1)]
    prepared = make(tmp_path, rows, NO_SPLIT + "[vocabulary]\nmin_count = 2\n")
    assert prepared.splits["train"].item.tolist() == [2, 2, OOV]


def test_max_size_keeps_the_most_frequent(tmp_path):
    rows = [("a", "x", 1, 1), ("a", "x", 2, 1), ("a", "x", 3, 1), ("a", "y", 4, 1), ("a", "y", 5, 1),
            ("a", "z", 6, 1)]
    prepared = make(tmp_path, rows, NO_SPLIT + "[vocabulary]\nmax_size = 2\n")
    assert prepared.schema.items.tokens == ["<pad>", "<oov>", "x", "y"]


def test_a_field_can_declare_its_own_vocabulary_policy(tmp_path):
    rows = [(u, "x", 1, 1) for u in ("a", "b", "c")]
    users = {"user_id": ["a", "b", "c"], "city": ["paris", "paris", "oslo"]}
    prepared = make(tmp_path, rows, NO_SPLIT + '[[user_fields]]\nname = "city"\n'
                                              "vocabulary = { min_count = 2, hash_buckets = 3 }\n", users=users)
    city = prepared.schema.user_field("city")
    assert city.vocab.tokens == ["<pad>", "<oov>", "paris"] and city.vocab.hash_buckets == 3
    profiles = prepared.splits["train"].profiles
    assert profiles[:, 0].tolist() == [2, 2, city.vocab.known_size + stable_hash("oslo") % 3]


# --- field encodings -------------------------------------------------------------------------------------
def test_numeric_fields_are_bucketed_by_edges(tmp_path):
    ages = [10, 18, 24.9, 25, 70, None]
    users = {"user_id": [f"u{k}" for k in range(6)], "age": ages, "score": [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]}
    rows = [(f"u{k}", "x", 1, 1) for k in range(6)]
    prepared = make(tmp_path, rows, NO_SPLIT + '[[user_fields]]\nname = "age"\nkind = "numeric"\n'
                                              "buckets = [18, 25, 65]\n"
                                              '[[user_fields]]\nname = "score"\nkind = "numeric"\n'
                                              'buckets = [1, 3]\nlabels = ["low", "mid", "high"]\n', users=users)
    age = prepared.schema.user_field("age")
    assert age.labels == ["<18", "[18,25)", "[25,65)", ">=65"]
    assert prepared.known_users.profile[:, 0].tolist() == ["<18", "[18,25)", "[18,25)", "[25,65)", ">=65", ""]
    assert prepared.known_users.profile[:, 1].tolist() == ["low", "mid", "mid", "high", "high", "high"]
    profiles = prepared.splits["train"].profiles
    assert profiles[5, 0] == OOV  # a missing value
    assert [age.vocab.tokens[i] for i in profiles[:5, 0]] == ["<18", "[18,25)", "[18,25)", "[25,65)", ">=65"]
    assert age.encode(30).tolist() == [age.vocab.lookup("[25,65)")]  # the service buckets a raw value alike


def test_multi_valued_field_from_a_list_column(tmp_path):
    items = {"item_id": ["x", "y", "z"], "tags": [["red", "big"], [], ["red"]]}
    rows = [("a", "x", 1, 1), ("a", "y", 2, 0), ("a", "z", 3, 1)]
    prepared = make(tmp_path, rows, NO_SPLIT + '[[item_fields]]\nname = "tags"\nkind = "multi"\n', items=items)
    check_tags(prepared, {"x": ["red", "big"], "y": [], "z": ["red"]})


def test_multi_valued_field_from_a_separated_string(tmp_path):
    items_csv = "item_id,tags\nx,red|big\ny,\nz,red\n"
    rows = [("a", "x", 1, 1), ("a", "y", 2, 0), ("a", "z", 3, 1)]
    prepared = make(tmp_path, rows, NO_SPLIT + '[[item_fields]]\nname = "tags"\nkind = "multi"\n'
                                              'separator = "|"\nempty = "none"\n', items_csv=items_csv)
    check_tags(prepared, {"x": ["red", "big"], "y": ["none"], "z": ["red"]})


def check_tags(prepared, expected: dict[str, list[str]]) -> None:
    schema = prepared.schema
    tags = schema.item_fields[0]
    assert tags.kind == "multi" and tags.width == 2
    table = schema.item_table["tags"]
    assert table.shape == (len(schema.items), 2)
    for item, tokens in expected.items():
        row = table[schema.items.lookup(item)]
        assert [tags.vocab.tokens[i] for i in row if i != PAD] == tokens
    assert (table[[PAD, OOV]] == PAD).all()


def test_fields_from_event_columns_take_each_users_latest_value(tmp_path):
    columns = events_table([("a", "x", 3, 1), ("a", "y", 1, 0), ("b", "x", 2, 1), ("a", "z", 2, 1)])
    columns["device"] = ["desktop", "mobile", "tablet", "mobile"]  # a's latest (ts 3) is desktop
    columns["shelf"] = ["top", "low", "mid", "low"]  # x's latest (ts 3) is top
    prepared = make(tmp_path, columns, NO_SPLIT + '[[user_fields]]\nname = "device"\n'
                                                  '[[item_fields]]\nname = "shelf"\n')
    assert prepared.spec.user_fields[0].source == "events"
    by_user = dict(zip(prepared.known_users.user_ids.tolist(), prepared.known_users.profile[:, 0].tolist(),
                       strict=True))
    assert by_user == {"a": "desktop", "b": "tablet"}
    schema = prepared.schema
    shelf = schema.item_fields[0]
    shelf_of = {item: shelf.vocab.tokens[schema.item_table["shelf"][schema.items.lookup(item)][0]]
                for item in ("x", "y", "z")}
    assert shelf_of == {"x": "top", "y": "low", "z": "low"}


def test_user_table_fields_and_users_without_a_row(tmp_path):
    users_csv = "user_id,tier\na,gold\n"  # b has no row: its field is missing (OOV)
    prepared = make(tmp_path, [("a", "x", 1, 1), ("b", "x", 2, 1)], NO_SPLIT + '[[user_fields]]\nname = "tier"\n',
                    users_csv=users_csv)
    tier = prepared.schema.user_field("tier")
    assert prepared.splits["train"].profiles[:, 0].tolist() == [tier.vocab.lookup("gold"), OOV]


# --- the feature-store snapshot --------------------------------------------------------------------------
def test_known_users_hold_the_latest_history_after_all_events(tmp_path):
    rows = [("a", "i1", 1, 1), ("a", "i2", 2, 1), ("a", "i3", 3, 0), ("a", "i4", 4, 1), ("a", "i5", 5, 0),
            ("b", "i1", 1, 0), ("b", "i2", 2, 0), ("b", "i3", 3, 0)]
    prepared = make(tmp_path, rows, "[behavior]\nmax_length = 2\n[split]\nvalid_frac = 0.2\ntest_frac = 0.2\n")
    known = prepared.known_users
    snapshot = {u: (known.history[k].tolist(), int(known.history_len[k])) for k, u in enumerate(known.user_ids)}
    # a's last clicks (i4 is in the test split) are there, most recent first; b never clicked
    assert snapshot == {"a": (["i4", "i2"], 2), "b": (["", ""], 0)}


# --- the shop --------------------------------------------------------------------------------------------
SMALL_SHOP = {"users": 300, "items": 80, "new_items": 6, "events_per_user": 20.0, "seed": 3}


def test_the_shop_spec_prepares_with_its_declared_fields(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from dataset.shop import ShopParams, new_item_ids

    monkeypatch.setenv("UDG_CACHE_DIR", str(tmp_path / "cache"))
    spec = load_spec("shop").with_overrides(**{"generator.params": SMALL_SHOP})
    prepared = prepare(spec)
    schema = prepared.schema
    assert schema.profile_fields == ["country", "device", "tier", "age_band"]
    assert schema.item_field_names == ["category", "brand", "price_band", "tags"]
    kinds = {f.name: f.kind for f in [*schema.user_fields, *schema.item_fields]}
    assert kinds["age_band"] == "numeric" and kinds["price_band"] == "numeric" and kinds["tags"] == "multi"
    assert set(schema.user_field("age_band").vocab.tokens[2:]) <= set(spec.user_fields[3].labels)
    assert schema.item_fields[3].width == 3
    assert 0.08 < prepared.stats["positive_rate"] < 0.35
    assert prepared.stats["users"] == 300 and len(prepared.splits["cold"])  # 5% cold users
    assert "log_decisiveness" in prepared.user_columns  # the planted per-user scale

    catalogue = pq.read_table(spec.source_dir() / "items.parquet").to_pydict()
    new = new_item_ids(ShopParams(**SMALL_SHOP))
    assert len(new) == 6 and set(new) <= set(catalogue["item_id"])
    events = pq.read_table(spec.source_dir() / "events.parquet", columns=["item_id"]).column("item_id").to_pylist()
    assert not set(new) & set(events)
    category = schema.item_fields[0]
    for item in new:
        assert not schema.items.known(item)  # no id embedding…
        row = catalogue["item_id"].index(item)
        assert category.known_value(catalogue["category"][row])  # …but a category the model knows
        assert schema.encode_item_fields({"category": catalogue["category"][row],
                                          "tags": catalogue["tags"][row]})["category"][0] > OOV


def test_the_shop_is_seeded_and_vectorised():
    from dataset.shop import ShopParams, generate

    a, b = generate(ShopParams(**SMALL_SHOP)), generate(ShopParams(**SMALL_SHOP))
    for table in ("events", "users"):
        for name, column in a[table].items():
            assert np.array_equal(column, b[table][name]), (table, name)
    started = time.perf_counter()
    big = generate(ShopParams(users=100_000, items=5_000))
    assert time.perf_counter() - started < 30
    assert len(big["users"]["user_id"]) == 100_000 and 0.05 < big["events"]["click"].mean() < 0.4
    stamps = big["events"]["timestamp"]
    assert (np.diff(stamps) >= 0).all()  # a log in time order


@pytest.mark.parametrize("name", ["shop", "synthetic"])
def test_builtin_generated_specs_load(name):
    assert load_spec(name).generator.kind == name


# --- the built-in worlds ---------------------------------------------------------------------------------
def test_synthetic_world_is_seeded_sized_and_has_its_profile_fields():
    from dataset.synthetic import SyntheticParams, generate

    params = SyntheticParams(users=50, items=20, events_per_user=8, seed=3)
    a, b = generate(params), generate(params)
    for table in ("events", "users", "items"):
        for name, column in a[table].items():
            assert np.array_equal(column, b[table][name]), (table, name)
    assert len(a["events"]["click"]) == 400 and 0.1 < a["events"]["click"].mean() < 0.9
    assert set(a["users"]) == {"user_id", "cohort", "sex", "segment", "log_decisiveness"}
    assert set(a["items"]) == {"item_id", "category"}
    assert not np.array_equal(generate(SyntheticParams(users=50, items=20, events_per_user=8, seed=4))["events"]
                              ["click"], a["events"]["click"])


def test_synthetic_spec_prepares_with_cold_users_out_of_vocabulary(tmp_path, monkeypatch):
    monkeypatch.setenv("UDG_CACHE_DIR", str(tmp_path / "cache"))
    spec = load_spec("synthetic").with_overrides(**{"generator.params.users": 100, "generator.params.items": 30,
                                                    "generator.params.events_per_user": 10,
                                                    "split.cold_user_frac": 0.2, "behavior.max_length": 6})
    prepared = prepare(spec)
    schema = prepared.schema
    assert schema.profile_fields == ["cohort", "sex", "segment"] and schema.item_field_names == ["category"]
    assert schema.user_field("sex").vocab.tokens[2:] == ["F", "M"] and schema.max_history == 6
    cold = prepared.splits["cold"]
    assert len(np.unique(cold.user_key)) == 20 and len(cold) == 200
    assert (cold.user == OOV).all()
    assert not set(np.unique(cold.user_key)) & set(np.unique(prepared.splits["train"].user_key))
    assert "log_decisiveness" in prepared.user_columns  # the planted scale, per user number


def test_movielens_age_buckets():
    from dataset.schema import FieldSchema

    age_spec = next(f for f in load_spec("movielens-100k").user_fields if f.name == "age")
    labels = age_spec.bucket_labels()
    age = FieldSchema(name="age", kind="numeric", vocab=Vocab(labels), buckets=age_spec.buckets, labels=labels)
    assert [age.bucket(a) for a in (7, 18, 30, 44, 49, 55, 73)] == [
        "<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
    assert age.bucket("30") == "25-34" and age.bucket("25-34") == "25-34" and age.bucket(None) is None


def write_grouplens(folder: Path, ratings: str = "1\t10\t5\t100\n1\t11\t2\t101\n2\t10\t4\t99\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text(ratings)
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    flags = ["0"] * 19
    flags[8] = "1"  # Drama
    (folder / "u.item").write_text(
        "10|Movie A (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n"
        "11|Movie B (1995)|01-Jan-1995||http://x|" + "|".join(["1"] + ["0"] * 18) + "\n",
        encoding="latin-1")
    return folder


def grouplens_spec(folder: Path):
    return load_spec("movielens-100k").with_overrides(**{"generator.params.grouplens_dir": str(folder)})


def test_grouplens_layout_through_the_movielens_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("UDG_CACHE_DIR", str(tmp_path / "cache"))
    prepared = prepare(grouplens_spec(write_grouplens(tmp_path / "ml-100k")))
    assert prepared.stats["events"] == 3 and prepared.stats["users"] == 2
    known = prepared.known_users
    profiles = dict(zip(known.user_ids.tolist(), known.profile.tolist(), strict=True))
    assert prepared.schema.profile_fields == ["age", "gender", "occupation"]
    assert profiles == {"1": ["18-24", "M", "technician"], "2": ["50-55", "F", "other"]}
    schema = prepared.schema
    genres = schema.item_fields[0]
    assert genres.name == "genres" and genres.kind == "multi"
    genre_of = {item: [genres.vocab.tokens[t] for t in schema.item_table["genres"][schema.items.lookup(item)]
                       if t != PAD] for item in ("10", "11")}
    assert genre_of == {"10": ["Drama"], "11": ["unknown"]}
    assert prepared.splits["train"].label.tolist() == [1.0, 0.0, 1.0]  # rating > 3: user 1 (5, 2), user 2 (4)


def test_grouplens_problems_are_clear_errors(tmp_path, monkeypatch):
    from dataset.errors import DataError

    monkeypatch.setenv("UDG_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"u\.data: file not found"):
        prepare(grouplens_spec(tmp_path / "empty"))
    folder = write_grouplens(tmp_path / "bad", ratings="1\t10\tfive\t100\n")
    with pytest.raises(DataError, match=r"ml-100k\.inter.*column 'rating:float'.*row 1") as error:
        prepare(grouplens_spec(folder))
    assert "five" in str(error.value)


def test_writers_of_the_same_generated_source_at_once_do_not_collide(tmp_path):
    """Every DDP rank prepares the log, so two processes (here threads) may generate the same seeded source into
    the same cache folder at once: each writes its own temporary file and renames it into place."""
    import threading

    import pyarrow.parquet as pq

    from dataset.synthetic import write_parquet

    tables = {"users": {"user_id": np.array([f"u{i}" for i in range(20_000)])}}
    start, errors = threading.Barrier(4), []

    def write():
        start.wait()
        try:
            for _ in range(5):
                write_parquet(tables, tmp_path)
        except OSError as error:  # a writer renamed another's file away
            errors.append(error)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert pq.read_table(tmp_path / "users.parquet").num_rows == 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["users.parquet"]  # no temporary file left behind
