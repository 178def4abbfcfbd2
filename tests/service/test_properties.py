"""Property tests of the codecs and pure functions: the feature store's value formats (embeddings, histories,
profiles, item tokens) round-trip for any input; id encoding maps every token to its own row, its hash
bucket or OOV (never PAD); the dedup window of the click script against a model of it, on a real Redis."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dataset.schema import OOV, PAD, FieldSchema, Vocab, stable_hash
from service.redis_layout import APPEND_CLICKS, LIVE_TAG, SEP, TAG_META, TAG_PUBLISHED, Click, RedisLayout

floats32 = hnp.arrays(np.float32, st.integers(1, 48), elements=st.floats(width=32, allow_nan=False))
# raw ids as clients send them: any text without the history separators
raw_id = st.text(st.characters(blacklist_characters=f"{SEP}\x1e", blacklist_categories=("Cs",)), min_size=1,
                 max_size=12)


@given(user=floats32, udg_dim=st.integers(0, 24), tag=st.sampled_from([TAG_PUBLISHED, TAG_META]), data=st.data())
def test_embeddings_round_trip_and_reject_other_dims(user, udg_dim, tag, data):
    udg = data.draw(hnp.arrays(np.float32, udg_dim, elements=st.floats(width=32, allow_nan=False)))
    packed = RedisLayout.pack_embeddings(user.reshape(1, -1), udg.reshape(1, -1), tag)
    assert len(packed) == 4 * (user.size + udg_dim) + 1
    got_user, got_udg, made_by_meta = RedisLayout.unpack_embeddings(packed, user.size, udg_dim)
    np.testing.assert_array_equal(got_user.reshape(-1), user)
    np.testing.assert_array_equal(got_udg.reshape(-1), udg)
    assert got_user.shape == (1, user.size) and got_udg.shape == (1, udg_dim)
    assert made_by_meta == (tag == TAG_META)
    assert RedisLayout.unpack_embeddings(packed, user.size + 1, udg_dim) is None  # another version's dims
    assert RedisLayout.unpack_embeddings(packed[:-1], user.size, udg_dim) is None  # truncated
    assert RedisLayout.unpack_embeddings(None, user.size, udg_dim) is None
    # float64 input is packed as float32; no UDG part (None) packs like an empty one
    assert RedisLayout.pack_embeddings(user.astype(np.float64).reshape(1, -1), udg.astype(np.float64), tag) == packed
    if udg_dim == 0:
        assert RedisLayout.pack_embeddings(user.reshape(1, -1), None, tag) == packed


@given(rows=st.integers(1, 6), user_dim=st.integers(1, 12), udg_dim=st.integers(0, 8),
       tag=st.sampled_from([TAG_PUBLISHED, TAG_META]), seed=st.integers(0, 2 ** 16))
def test_bulk_packing_is_byte_identical_to_packing_each_row(rows, user_dim, udg_dim, tag, seed):
    rng = np.random.default_rng(seed)
    user = rng.standard_normal((rows, user_dim)).astype(np.float32)
    udg = rng.standard_normal((rows, udg_dim)).astype(np.float32)
    packed = RedisLayout.pack_embedding_rows(user, udg, tag)
    np.testing.assert_array_equal(RedisLayout.pack_embedding_rows(user.astype(np.float64), udg.astype(np.float64),
                                                                  tag), packed)
    for row in range(rows):
        assert packed[row].tobytes() == RedisLayout.pack_embeddings(user[row:row + 1], udg[row:row + 1], tag)


@given(items=st.lists(raw_id, max_size=30), limit=st.integers(1, 40), live=st.lists(st.booleans(), max_size=30))
@example(items=["iX", "X", "b ", "aX"], limit=5, live=[True, False, True, True])  # ends the strip must keep
def test_history_round_trips_most_recent_first_and_cuts_at_the_limit(items, limit, live):
    joined = RedisLayout.join_history(items).encode()
    assert RedisLayout.split_history(joined, limit) == items[:limit]
    # entries written by events carry the live tag: read the same, and told apart by split_entries
    flags = (live + [False] * len(items))[:len(items)]
    tagged = SEP.join(item + ("\x1e" if flag else "") for item, flag in zip(items, flags, strict=True)).encode()
    assert RedisLayout.split_history(tagged, limit) == items[:limit]
    if items:
        assert RedisLayout.split_entries(tagged) == list(zip(items, flags, strict=True))
    assert LIVE_TAG not in b"".join(s.encode() for s in RedisLayout.split_history(tagged, limit))
    assert RedisLayout.split_history(None, limit) == [] and RedisLayout.split_history(b"", limit) == []


def test_history_bytes_that_are_not_utf8_read_as_replacement_characters():
    raw = b"i1" + SEP.encode() + b"\xffbad" + SEP.encode() + b"i3\x1e"
    assert RedisLayout.split_history(raw, 10) == ["i1", "\ufffdbad", "i3"]
    assert RedisLayout.split_entries(raw) == [("i1", False), ("\ufffdbad", False), ("i3", True)]


@given(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=6), st.randoms(use_true_random=False))
def test_profile_round_trips_without_empty_values_whatever_the_key_order(profile, rng):
    packed = RedisLayout.pack_profile(profile)
    assert RedisLayout.unpack_profile(packed) == {k: v for k, v in profile.items() if v != ""}
    shuffled = list(profile.items())
    rng.shuffle(shuffled)
    assert RedisLayout.pack_profile(dict(shuffled)) == packed  # canonical: SET NX compares nothing, but caches do
    assert RedisLayout.unpack_profile(b"not json") is None and RedisLayout.unpack_profile(b"[1]") is None


@given(hnp.arrays(np.int64, st.integers(0, 16), elements=st.integers(-2 ** 31, 2 ** 31 - 1)))
def test_item_tokens_round_trip_and_reject_another_width(tokens):
    packed = RedisLayout.pack_item_tokens(tokens)
    unpacked = RedisLayout.unpack_item_tokens(packed, len(tokens))
    np.testing.assert_array_equal(unpacked, tokens)
    assert unpacked.dtype == np.int64
    assert RedisLayout.pack_item_tokens(tokens.reshape(1, -1)) == packed  # a [1, width] row packs the same
    assert RedisLayout.unpack_item_tokens(packed, len(tokens) + 1) is None


@given(vocabulary=st.sets(raw_id, max_size=20), queries=st.lists(raw_id, max_size=20),
       hash_buckets=st.sampled_from([0, 1, 7, 64]))
@example(vocabulary={"a", "b"}, queries=["<pad>", "<oov>", "a"], hash_buckets=0)
@example(vocabulary={"a", "<oov>"}, queries=["<pad>", "<oov>"], hash_buckets=5)
@example(vocabulary=set(), queries=["\x00", "a\x00"], hash_buckets=7)  # a numpy str array drops trailing NULs
def test_every_token_maps_to_its_row_its_bucket_or_oov_never_padding(vocabulary, queries, hash_buckets):
    vocab = Vocab(vocabulary, hash_buckets)
    assert len(vocab) == len(vocabulary) + 2 + hash_buckets
    rows = {vocab.lookup(token) for token in vocabulary}
    assert rows == set(range(2, 2 + len(vocabulary)))  # one row each, after PAD and OOV
    for token in [*queries, *vocabulary]:
        index = vocab.lookup(token)
        assert index != PAD
        if token in vocabulary:
            assert vocab.known(token) and vocab.tokens[index] == token
        elif hash_buckets:
            assert index == vocab.known_size + stable_hash(token) % hash_buckets  # the same bucket in every run
        else:
            assert index == OOV and not vocab.known(token)
    np.testing.assert_array_equal(vocab.lookup_many(queries), [vocab.lookup(t) for t in queries])
    again = Vocab.from_json(vocab.to_json())
    assert [again.lookup(t) for t in queries] == [vocab.lookup(t) for t in queries]


@given(values=st.lists(st.sampled_from(["x", "y", "z", "w", ""]), max_size=6), width=st.integers(1, 4),
       as_text=st.booleans(), empty=st.sampled_from([None, "z"]))
def test_multi_field_encoding_is_pad_filled_and_a_missing_value_is_one_slot(values, width, as_text, empty):
    field = FieldSchema("genre", "multi", Vocab(["x", "y", "z"]), separator="|", empty=empty, width=width)
    kept = [t for t in values if t != ""]
    if not kept and empty is not None:
        kept = [empty]  # a value with no item stands for the declared empty token
    assert field.tokens("|".join(values) if as_text else values) == kept
    encoded = field.encode("|".join(values) if as_text else values, missing=OOV)
    assert encoded.shape == (width,) and encoded.dtype == np.int64
    if not kept:
        assert encoded.tolist() == [OOV] + [PAD] * (width - 1)
    else:
        rows = {"x": 2, "y": 3, "z": 4, "w": OOV}  # sorted vocabulary after PAD and OOV; w is unknown
        assert encoded.tolist() == [rows[t] for t in kept[:width]] + [PAD] * (width - len(kept[:width]))


def test_categorical_and_numeric_fields_encode_raw_values():
    category = FieldSchema("sex", "categorical", Vocab(["F", "M"]))
    assert [int(category.encode(v)[0]) for v in ("F", "M", "X", "", None, 3)] == [2, 3, OOV, OOV, OOV, OOV]
    assert category.tokens("M") == ["M"] and category.tokens("") == [] and category.tokens(7) == ["7"]
    age = FieldSchema("age", "numeric", Vocab(["hi", "lo", "mid"]), buckets=[18, 65], labels=["lo", "mid", "hi"])
    assert age.tokens(30) == ["mid"] and age.tokens("70") == ["hi"] and age.tokens("lo") == ["lo"]
    assert age.tokens("old") == [] and age.tokens(float("nan")) == [] and age.tokens(True) == []
    assert [int(age.encode(v)[0]) for v in (10, 18, 64.9, 65, "x")] == [3, 4, 4, 2, OOV]
    spaced = FieldSchema("tags", "multi", Vocab(["a", "b"]), width=3)  # no separator: whitespace
    assert spaced.tokens(" a  b ") == ["a", "b"] and spaced.encode(" a  b ").tolist() == [2, 3, PAD]


def test_hashes_and_vocabularies_are_pinned_and_round_trip():
    # the hash bucket of a raw id is part of a trained model: it must not change between releases
    assert (stable_hash("a"), stable_hash("\ud800"), stable_hash("")) == (
        4681665781835383343, 4758185216457903464, 16476032584258269876)
    assert Vocab.from_json(["b", "a"]).lookup("a") == 2  # a plain token list
    assert len(Vocab.from_json({"tokens": ["a"]})) == 3  # no hash buckets unless declared
    vocab = Vocab(["a", "b", "c"])
    assert vocab.lookup_many([]).dtype == np.int64 and vocab.lookup_many(np.array([], str)).shape == (0,)
    grid = vocab.lookup_many(np.array([["a", "zz"], ["c", "a"]]))
    assert grid.dtype == np.int64 and grid.tolist() == [[2, OOV], [4, 2]]
    assert not vocab.known("<oov>") and not vocab.known("<pad>") and vocab.known("a")


# --- the dedup window of APPEND_CLICKS, on a real Redis ----------------------------------------------------
WINDOW_MS, DEDUP_CAP, HISTORY_CAP = 1000, 4, 5
delivery = st.tuples(st.sampled_from(["a", "b", "c", "d", "e", "f"]),  # event identity (small: retries happen)
                     st.integers(0, 700))  # ms since the previous delivery


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(deliveries=st.lists(delivery, min_size=1, max_size=14))
def test_dedup_window_stores_each_delivery_once_per_window_and_bounds_the_history(redis_client, deliveries):
    layout = RedisLayout(history_cap=HISTORY_CAP, dedup_window_s=WINDOW_MS / 1000, dedup_cap=DEDUP_CAP)
    script = redis_client.register_script(APPEND_CLICKS)
    user = uuid.uuid4().hex
    now, first_seen, history = 10_000, {}, []
    for identity, gap in deliveries:
        now += gap
        keys, args = layout._click_call(user, [Click(item_id=f"item-{identity}", event_id=identity)], None, now)
        [flag] = script(keys=keys, args=args)
        # the model: identities expire WINDOW_MS after their first delivery; at most DEDUP_CAP remembered
        first_seen = {i: t for i, t in first_seen.items() if t >= now - WINDOW_MS}
        if identity in first_seen:
            expected = 0
        elif len(first_seen) >= DEDUP_CAP:
            expected = -1
        else:
            expected, first_seen[identity] = 1, now
            history.insert(0, f"item-{identity}")
        assert flag == expected, (deliveries, identity, now)
    stored = layout.split_entries(redis_client.get(layout.history(user)))
    assert stored == [(item, True) for item in history[:HISTORY_CAP]]


@pytest.mark.parametrize("token", ["<pad>", "<oov>"])
def test_reserved_row_names_are_ordinary_tokens_for_lookup(token):
    assert Vocab(["a"]).lookup(token) == OOV
    assert Vocab(["a", token]).lookup(token) not in (PAD, OOV)


def test_clicks_set_a_profile_only_when_given_one(redis_client):
    layout = RedisLayout()
    script = redis_client.register_script(APPEND_CLICKS)
    keys, args = layout._click_call("with", [Click("i1", event_id="a")], {"sex": "F", "age": ""}, 1000)
    assert script(keys=keys, args=args) == [1]
    assert redis_client.get(layout.profile("with")) == layout.pack_profile({"sex": "F"})
    keys, args = layout._click_call("without", [Click("i1", event_id="a")], None, 1000)
    assert script(keys=keys, args=args) == [1]
    assert not redis_client.exists(layout.profile("without"))


@given(counted=st.dictionaries(raw_id, st.integers(0, 6), max_size=25), min_count=st.integers(0, 4),
       max_size=st.one_of(st.none(), st.integers(0, 30)), hash_buckets=st.integers(0, 3))
def test_a_vocabulary_keeps_the_frequent_tokens_its_policy_allows(counted, min_count, max_size, hash_buckets):
    """from_counts against a model: tokens seen at least min_count times, then the max_size most frequent (ties
    by token), stored sorted; the hash buckets carried over."""
    tokens, counts = list(counted), [counted[t] for t in counted]
    kept = sorted((-c, t) for t, c in counted.items() if c >= min_count)
    if max_size is not None:
        kept = kept[:max_size]
    vocab = Vocab.from_counts(np.array(tokens, dtype=object), np.array(counts, dtype=np.int64), min_count=min_count,
                              max_size=max_size, hash_buckets=hash_buckets)
    assert vocab.tokens[2:] == sorted(t for _, t in kept) and vocab.hash_buckets == hash_buckets


def test_a_vocabulary_defaults_to_every_token_once_seen():
    vocab = Vocab.from_counts(np.array(["b", "a", "c"]), np.array([1, 0, 5]))
    assert vocab.tokens == ["<pad>", "<oov>", "b", "c"] and vocab.hash_buckets == 0
    # a trailing NUL is part of the token, whatever the input array's type (numpy str arrays drop it)
    assert Vocab.from_counts(np.array(["a\0", "a"], dtype=object), np.array([1, 1])).tokens[2:] == ["a", "a\0"]
    # a tie at the cut: the token that sorts first is kept
    assert Vocab.from_counts(np.array(["y", "x", "z"]), np.array([2, 2, 3]), max_size=2).tokens[2:] == ["x", "z"]
