"""The attempt ledger: deaths are counted per key in flight, and only the culprit is charged again."""

from __future__ import annotations

from pipeline.ledger import AttemptLedger, Guard

A, B, C = ("caption", "s3://b/a.mp4", "1"), ("caption", "s3://b/b.mp4", "1"), ("caption", "s3://b/c.mp4", "1")


def test_a_finished_attempt_is_not_a_crash():
    ledger = AttemptLedger()
    assert ledger.begin([A, B], "w1") == [0, 0]
    ledger.done([A, B])
    assert ledger.begin([A, B], "w2") == [0, 0]
    assert ledger.summary() == {"worker_crashes": {}, "crashed_videos": []}


def test_keys_still_in_flight_at_the_next_begin_are_charged():
    ledger = AttemptLedger()
    ledger.begin([A, B, C], "w1")  # w1 dies: no done
    assert ledger.begin([A, B, C], "w2") == [1, 1, 1]
    # w2 isolates them: A and B finish, C kills w2 again.
    ledger.done([A, B, C])
    for key in (A, B):
        ledger.begin([key], "w2")
        ledger.done([key])
    ledger.begin([C], "w2")
    assert ledger.begin([A, B, C], "w3") == [1, 1, 2]
    summary = ledger.summary()
    assert summary["worker_crashes"] == {"caption": 4}
    assert summary["crashed_videos"] == ["s3://b/a.mp4", "s3://b/b.mp4", "s3://b/c.mp4"]


def test_guard_without_a_ledger_counts_nothing():
    guard = Guard(None, "decode", max_crashes=3, worker="w")
    rows = [{"video_uri": "x", "etag": "e"}]
    assert guard.begin(rows) == [0]
    guard.done(rows)
    assert not guard.gave_up(2) and guard.gave_up(3)
    assert "died 3 times" in guard.message(3) and "max_worker_crashes=3" in guard.message(3)
