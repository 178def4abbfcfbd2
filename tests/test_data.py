"""Data sources and features: parsing, the no-leak history rule, time splits, vocabularies."""

from __future__ import annotations

import numpy as np
import pytest
from model.datasets import (
    DataError,
    RawDataset,
    SyntheticSpec,
    age_bucket,
    load_grouplens_ml100k,
    load_movielens,
    make_synthetic,
)
from model.features import OOV, PAD, Vocab, histories_for_user, prepare, time_split_positions


def tiny_raw(events, profiles=None, genres=None) -> RawDataset:
    users, items, ratings, ts = zip(*events, strict=True)
    profiles = profiles or {u: {"age": "25-34", "gender": "F", "occupation": "other"} for u in set(users)}
    genres = genres or {i: ["Drama"] for i in set(items)}
    return RawDataset("tiny", np.array(users), np.array(items), np.array(ratings, np.float32),
                      np.array(ts, np.int64), profiles, genres)


def test_history_excludes_same_timestamp_and_later_clicks():
    items = np.array([10, 11, 12, 13, 14])
    ts = np.array([1, 2, 2, 3, 4])
    clicked = np.array([True, True, True, False, True])
    hist = histories_for_user(items, ts, clicked, max_len=3)
    assert hist[0].tolist() == [PAD, PAD, PAD]  # nothing before the first event
    assert hist[1].tolist() == [10, PAD, PAD]  # 12 shares the timestamp: not visible
    assert hist[2].tolist() == [10, PAD, PAD]  # 11 shares the timestamp: not visible
    assert hist[3].tolist() == [12, 11, 10]  # most recent first
    assert hist[4].tolist() == [12, 11, 10]  # 13 was not clicked


def test_history_is_capped_to_the_most_recent():
    items = np.arange(20, 30)
    ts = np.arange(10)
    hist = histories_for_user(items, ts, np.ones(10, bool), max_len=4)
    assert hist[-1].tolist() == [28, 27, 26, 25]


def test_vocab_reserves_pad_and_oov():
    vocab = Vocab(["b", "a", "a"])
    assert vocab.lookup("a") == 2 and vocab.lookup("b") == 3
    assert vocab.lookup("never seen") == OOV
    assert vocab.lookup_many(["b", "zz"]).tolist() == [3, OOV]
    assert Vocab.from_json(vocab.to_json()).index == vocab.index


def test_time_split_positions_take_the_last_events():
    labels = time_split_positions(20, valid_frac=0.1, test_frac=0.1)
    assert labels.tolist() == [0] * 16 + [1] * 2 + [2] * 2


def test_prepare_labels_splits_and_unseen_items():
    events = [("u1", f"i{k}", 5.0 if k % 2 else 1.0, k) for k in range(10)]
    events += [("u2", "i0", 4.0, 1), ("u2", "i1", 2.0, 2), ("u2", "i9", 5.0, 3)]
    data = prepare(tiny_raw(events), max_history=5)
    train, test = data.splits["train"], data.splits["test"]
    assert set(np.unique(train.label)) <= {0.0, 1.0}
    # rating > 3 is a click
    assert data.splits["train"].label[:4].tolist() == [0.0, 1.0, 0.0, 1.0]
    # u1's last event (i9) is in test; i9 appears in u2's training events only after... u2 has 3 events
    assert len(test) == 2
    # items that never occur in training map to OOV
    assert "i9" not in data.space.items.index or test.item.min() >= OOV
    # histories only contain training-vocabulary indices or PAD
    assert test.history.max() < len(data.space.items)


def test_cold_users_are_out_of_vocabulary():
    raw = make_synthetic(SyntheticSpec(users=100, items=30, events_per_user=10))
    data = prepare(raw, cold_user_frac=0.2)
    cold = data.splits["cold"]
    assert len(np.unique(cold.user_key)) == 20
    assert (cold.user == OOV).all()
    assert not set(np.unique(cold.user_key)) & set(np.unique(data.splits["train"].user_key))


def test_synthetic_generator_is_seeded_and_sized():
    a = make_synthetic(SyntheticSpec(users=50, items=20, events_per_user=8, seed=3))
    b = make_synthetic(SyntheticSpec(users=50, items=20, events_per_user=8, seed=3))
    assert len(a) == 400 and np.array_equal(a.ratings, b.ratings) and np.array_equal(a.items, b.items)
    assert 0.1 < a.labels().mean() < 0.9
    assert set(a.profiles["u0"]) == {"age", "gender", "occupation"}


def test_age_buckets():
    assert [age_bucket(a) for a in (7, 18, 30, 44, 49, 55, 73)] == [
        "<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]


def test_grouplens_layout(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t5\t100\n1\t11\t2\t101\n2\t10\t4\t99\n")
    (tmp_path / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    flags = ["0"] * 19
    flags[8] = "1"  # Drama
    (tmp_path / "u.item").write_text(
        "10|Movie A (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n"
        "11|Movie B (1995)|01-Jan-1995||http://x|" + "|".join(["1"] + ["0"] * 18) + "\n",
        encoding="latin-1")
    raw = load_grouplens_ml100k(tmp_path)
    assert raw.stats()["events"] == 3
    assert raw.profiles["2"] == {"age": "50-55", "gender": "F", "occupation": "other"}
    assert raw.item_genres == {"10": ["Drama"], "11": ["unknown"]}
    assert load_movielens(tmp_path).stats() == raw.stats()


def test_missing_or_unknown_layout_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="neither u.data"):
        load_movielens(tmp_path)
    (tmp_path / "u.data").write_text("1\t10\tfive\t100\n")
    with pytest.raises(DataError, match="u.data"):
        load_grouplens_ml100k(tmp_path)
