"""Files written into the shared data cache: two processes generating the same file at once (the ranks of a
distributed run) both succeed and leave one whole file, never a temporary."""

from __future__ import annotations

import multiprocessing

import pytest

from dataset.files import write_atomically


def _write_many(target, text, start, rounds):
    start.wait()
    for _ in range(rounds):
        write_atomically(target, lambda tmp: tmp.write_text(text))


def test_concurrent_writers_of_one_target_both_succeed(tmp_path):
    target = tmp_path / "events.parquet"
    text = "x" * 100_000
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    writers = [context.Process(target=_write_many, args=(target, text, start, 200)) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert [writer.exitcode for writer in writers] == [0, 0]
    assert target.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["events.parquet"]  # no temporary left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "users.parquet"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["users.parquet"]
