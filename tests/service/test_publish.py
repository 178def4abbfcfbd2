"""`udg publish` and `udg publish-items` (service/publish.py) on the shared tiny version and a real redis-server:
what users.npz must hold, which directory is which version, the completion marker, the shared keys kept or
replaced, the history merge after a loss, and the item table."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from repository import manifest_sha256
from service import publish as publishing
from service.publish import PublishError, load_users, publish, publish_items, version_dir_info
from service.redis_layout import LAYOUT_FORMAT, RedisLayout
from tests.conftest import VERSION

LAYOUT = RedisLayout()


def write_users(path, users, **changes):
    arrays = {**users, **changes}
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("change, message", [
    ({"user_vec": None}, r"missing arrays \['user_vec'\]"),
    ({"udg_vec": "short"}, "udg_vec has 3 rows for"),
    ({"history_len": "short"}, "history_len has 3 rows for"),
    ({"user_ids": "empty"}, "empty user id"),
    ({"history": "separator"}, r"an item id contains the history separator \\x1f or the live tag \\x1e"),
    ({"history": "live-tag"}, "an item id contains the history separator"),
])
def test_users_npz_is_refused_when_inconsistent(users, tmp_path, change, message):
    name, how = next(iter(change.items()))
    arrays = dict(users)
    if how is None:
        del arrays[name]
    elif how == "short":
        arrays[name] = arrays[name][:3]
    elif how == "empty":
        arrays[name] = arrays[name].copy()
        arrays[name][4] = ""
    else:
        history = arrays[name].astype(object)
        history[2][0] = "i\x1f1" if how == "separator" else "i1\x1e"
        arrays[name] = history.astype(str)
    path = write_users(tmp_path / "users.npz", arrays)
    with pytest.raises(PublishError, match=message):
        load_users(path)


def test_users_npz_loads_every_array(users, tmp_path):
    loaded = load_users(write_users(tmp_path / "users.npz", users))
    assert set(loaded) == set(publishing.USERS_ARRAYS)
    np.testing.assert_array_equal(loaded["user_vec"], users["user_vec"])
    empty = {k: v[:0] for k, v in users.items() if k != "profile_fields"}
    assert len(load_users(write_users(tmp_path / "none.npz", {**empty, "profile_fields": users["profile_fields"]}))[
        "user_ids"]) == 0  # no users: nothing to check, nothing refused


def test_the_version_is_the_directorys_name(model_repo, tmp_path):
    version, manifest, sha = version_dir_info(model_repo / VERSION)
    assert (version, manifest["version"], sha) == (VERSION, VERSION, manifest_sha256(model_repo / VERSION))
    with pytest.raises(PublishError, match="no manifest.json; expected a version directory written by `udg export`"):
        version_dir_info(tmp_path)
    copy = tmp_path / "v7"
    shutil.copytree(model_repo / VERSION, copy)
    with pytest.raises(PublishError, match="the directory is named 'v7' but its manifest is version 'v1'"):
        version_dir_info(copy)
    (copy / "manifest.json").write_text("{")
    with pytest.raises(PublishError, match="manifest"):
        version_dir_info(copy)


def test_chunks_cover_every_row_once():
    arrays = {"user_ids": np.arange(7)}
    assert list(publishing._chunks(arrays, 3)) == [(0, 3), (3, 6), (6, 7)]
    assert list(publishing._chunks(arrays, 7)) == [(0, 7)]
    assert list(publishing._chunks({"user_ids": np.arange(0)}, 3)) == []


def test_the_marker_records_the_publish(redis_client, model_repo, users):
    result = publish(model_repo / VERSION, redis_client, progress=False)
    marker = LAYOUT.unpack_marker(redis_client.get(LAYOUT.marker(VERSION)))
    assert marker == result.marker
    n = len(users["user_ids"])
    assert (result.version, result.users, marker["version"], marker["users"]) == (VERSION, n, VERSION, n)
    assert marker["manifest_sha256"] == manifest_sha256(model_repo / VERSION)
    assert (marker["user_dim"], marker["udg_dim"]) == (users["user_vec"].shape[1], users["udg_vec"].shape[1])
    assert marker["layout"] == LAYOUT_FORMAT and marker["items"] == 0  # every item of the tiny version is known
    assert marker["epoch"] == redis_client.get(LAYOUT.epoch).decode()
    assert 0 <= marker["seconds"] == round(result.seconds, 3)
    assert result.merged == marker["merged_histories"] == 0  # an empty Redis: no live clicks to merge


def test_dims_that_differ_from_the_manifest_are_refused(redis_client, model_repo, users):
    wrong = {**users, "udg_vec": users["udg_vec"][:, :3]}
    with pytest.raises(PublishError, match=r"users.npz dims \(32, 3\) differ from the manifest's \(32, 8\)"):
        publish(model_repo / VERSION, redis_client, progress=False, users=wrong)
    assert redis_client.get(LAYOUT.marker(VERSION)) is None


def test_a_republish_keeps_live_state_and_overwrite_shared_replaces_it(redis_client, model_repo, users):
    row = int(np.argmax(users["history_len"]))
    uid = str(users["user_ids"][row])
    publish(model_repo / VERSION, redis_client, progress=False)
    redis_client.set(LAYOUT.history(uid), "live\x1e")  # a click received since
    redis_client.set(LAYOUT.profile(uid), LAYOUT.pack_profile({"sex": "changed"}))
    again = publish(model_repo / VERSION, redis_client, progress=False)
    assert again.merged == 0  # a complete marker existed: no merge, shared keys left alone
    assert redis_client.get(LAYOUT.history(uid)) == b"live\x1e"
    assert LAYOUT.unpack_profile(redis_client.get(LAYOUT.profile(uid))) == {"sex": "changed"}
    publish(model_repo / VERSION, redis_client, progress=False, overwrite_shared=True)
    snapshot = users["history"][row][:users["history_len"][row]].tolist()
    assert LAYOUT.split_history(redis_client.get(LAYOUT.history(uid)), 100) == snapshot[:LAYOUT.history_cap]
    assert LAYOUT.unpack_profile(redis_client.get(LAYOUT.profile(uid))) != {"sex": "changed"}


def test_catalogue_items_are_published_into_the_item_table(redis_client, model_repo, tmp_path):
    version = tmp_path / VERSION
    shutil.copytree(model_repo / VERSION, version)
    with np.load(version / "items.npz") as data:
        items = {k: data[k] for k in data.files}
    items["known"] = items["known"].copy()
    first_known = int(np.flatnonzero(items["known"])[0])
    items["known"][first_known] = False  # an item the version has features for but was not trained on
    np.savez(version / "items.npz", **items)
    manifest = version_dir_info(version)[1]
    assert publishing.publish_item_table(version, manifest, redis_client, LAYOUT) == 1
    table = {k.decode(): LAYOUT.unpack_item_tokens(v, 1) for k, v in redis_client.hgetall(
        LAYOUT.item_table(VERSION)).items()}
    assert list(table) == [str(items["item_ids"][first_known])]
    assert table[str(items["item_ids"][first_known])].tolist() == items["field_category"][first_known].tolist()
    no_fields = {**manifest, "features": {**manifest["features"], "item_fields": []}}
    assert publishing.publish_item_table(version, no_fields, redis_client, LAYOUT) == 0


def test_publish_items_writes_new_items_and_keeps_trained_ones(redis_client, model_repo, artifact, tmp_path):
    known_id = artifact.schema.items.tokens[2]
    category = artifact.schema.item_fields[0]
    file = tmp_path / "new.csv"
    file.write_text(f"item_id,category\nbrand-new,c3\n{known_id},c1\nother-new,never-seen\n")
    result = publish_items(model_repo / VERSION, file, redis_client)
    assert (result.version, result.written, result.known) == (VERSION, 2, 1) and result.generation >= 1
    table = {k.decode(): LAYOUT.unpack_item_tokens(v, 1).tolist() for k, v in redis_client.hgetall(
        LAYOUT.item_table(VERSION)).items()}
    assert table == {"brand-new": [category.vocab.lookup("c3")], "other-new": [1]}  # an unknown value: OOV
    only_known = tmp_path / "known.csv"
    only_known.write_text(f"item_id,category\n{known_id},c1\n")
    again = publish_items(model_repo / VERSION, only_known, redis_client)
    assert (again.written, again.known, again.generation) == (0, 1, result.generation)  # nothing written


def test_used_memory_sums_the_primaries(redis_client):
    used = publishing.redis_used_memory(redis_client)
    assert 0.5 < used / int(redis_client.info("memory")["used_memory"]) < 2  # one node: its own figure


def test_published_at_is_utc_whatever_the_local_zone(redis_client, model_repo, monkeypatch):
    import calendar
    import time

    monkeypatch.setenv("TZ", "Asia/Tokyo")  # UTC+9: a local-time stamp would be 9 hours off
    time.tzset()
    try:
        marker = publish(model_repo / VERSION, redis_client, progress=False).marker
    finally:
        monkeypatch.undo()
        time.tzset()
    stamp = calendar.timegm(time.strptime(marker["published_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(stamp - time.time()) < 120


def test_a_store_that_lost_a_part_merges_histories_although_markers_remain(redis_client, model_repo, users):
    """A wiped cluster node keeps no sentinel of the epoch (the markers live elsewhere): the republish merges
    the live clicks that arrived since, instead of keeping the partial state as if it were complete."""
    row = int(np.argmax(users["history_len"]))
    uid = str(users["user_ids"][row])
    publish(model_repo / VERSION, redis_client, progress=False)
    for key in list(redis_client.scan_iter(match="udg:epoch:*", count=10_000)):
        redis_client.delete(key)  # the node holding these slots lost its keys
    redis_client.delete(LAYOUT.history(uid))
    redis_client.set(LAYOUT.history(uid), "live\x1e")  # a click received since the loss
    again = publish(model_repo / VERSION, redis_client, progress=False)
    assert again.merged >= 1
    snapshot = users["history"][row][:users["history_len"][row]].tolist()
    assert LAYOUT.split_history(redis_client.get(LAYOUT.history(uid)), 100) == ["live", *snapshot][:LAYOUT.history_cap]
