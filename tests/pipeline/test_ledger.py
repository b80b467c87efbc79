"""The attempt ledger: deaths are counted per key in flight, and only the culprit is charged again."""

from __future__ import annotations

from pipeline.ledger import AttemptLedger, Guard

A, B, C = ("caption", "s3://b/a.mp4", "1"), ("caption", "s3://b/b.mp4", "1"), ("caption", "s3://b/c.mp4", "1")


def test_a_finished_attempt_is_not_a_crash():
    ledger = AttemptLedger()
    assert ledger.begin([A, B], "w1") == [0, 0]
    ledger.done([A, B])
    assert ledger.begin([A, B], "w2") == [0, 0]
    assert ledger.summary() == {"worker_crashes": {}, "crashed_videos": [], "lost_with_node": 0}


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


def test_keys_in_flight_on_a_node_that_is_gone_are_not_charged():
    live = {"node-a", "node-b"}
    ledger = AttemptLedger(live_nodes=lambda: set(live))
    ledger.begin([A, B], "node-b/host:1")  # node-b is lost with its process
    ledger.begin([C], "node-a/host:2")  # this process dies on a node that stays
    live.discard("node-b")
    assert ledger.begin([A, B, C], "node-a/host:3") == [0, 0, 1]
    assert ledger.summary()["lost_with_node"] == 2 and ledger.summary()["crashed_videos"] == ["s3://b/c.mp4"]


def test_guard_run_makes_one_call_each_way_per_block_and_isolates_after_a_death():
    class Counting(AttemptLedger):
        calls = 0

        def begin(self, keys, worker):
            Counting.calls += 1
            return super().begin(keys, worker)

    class Handle:  # the actor handle's shape, served in-process
        def __init__(self, ledger):
            self.begin = type("M", (), {"remote": staticmethod(ledger.begin)})
            self.done = type("M", (), {"remote": staticmethod(ledger.done)})

    import ray

    ledger = Counting(live_nodes=lambda: {"n"})
    guard = Guard(Handle(ledger), "decode", max_crashes=2, worker="n/w")
    rows = [{"video_uri": u, "etag": "1"} for u in ("a", "b", "c")]
    get = ray.get
    ray.get = lambda x: x
    try:
        seen: list[list[str]] = []
        guard.run(rows, lambda block: seen.append([r["video_uri"] for r in block]), lambda r, n: None)
        assert seen == [["a", "b", "c"]] and Counting.calls == 1
        ledger.begin([("decode", "b", "1")], "n/dead")  # an attempt at b died
        seen.clear()
        gave_up: list[str] = []
        guard.run(rows, lambda block: seen.append([r["video_uri"] for r in block]), lambda r, n: gave_up.append(r))
        assert seen == [["a"], ["b"], ["c"]] and not gave_up  # one at a time: only a killer is charged again
        ledger.begin([("decode", "b", "1")], "n/dead")
        guard.run(rows, lambda block: seen.append([r["video_uri"] for r in block]), lambda r, n: gave_up.append(r))
        assert [r["video_uri"] for r in gave_up] == ["b"]  # charged max_crashes times: no more work
    finally:
        ray.get = get
