"""The driver loop of run_job without a cluster: the dataset is a stand-in that hands over blocks when
the test says so, so what the driver writes between blocks can be watched. Local input and output."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.ledger
import pipeline.run
from pipeline.config import load_config
from pipeline.run import JobIncomplete, run_job

PASSWORD = "pa55-W0RD-not-for-logs"
ENDPOINT_ERROR = (
    f"cannot read s3://b/clips/x.mp4: EndpointConnectionError: Could not connect to the endpoint URL: "
    f'"http://admin:{PASSWORD}@10.0.0.1:9000/b/clips/x.mp4"'
)
PRESIGNED_ERROR = (
    "decode failed: HTTPError: 403 for https://b.s3.amazonaws.com/clips/y.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    f"&X-Amz-Credential=AKIA{PASSWORD}%2F20250101%2Fus-east-1&X-Amz-Signature={PASSWORD}"
)


def _row(uri: str, etag: str, size: int, error: str = "") -> dict:
    return {
        "video_uri": uri,
        "etag": etag,
        "size": size,
        "caption": "" if error else "a red ball rolls left",
        "num_tokens": 0 if error else 5,
        "acceptance_length": 0.0 if error else 2.5,
        "decode_s": 0.01,
        "generate_s": 0.0 if error else 0.02,
        "model": "tiny",
        "drafter": "",
        "error": error,
        "error_kind": "permanent" if error else "",
        "worker_node": "127.0.0.1",
        "finished_at": datetime.now(UTC),
    }


class StandIn:
    """A dataset whose iter_batches yields the given blocks, waiting on `gate` before block i when
    `waits` holds i, and raising `fail` (if given) after the last block."""

    def __init__(self, blocks: list[list[dict]], waits=(), gate=None, fail: Exception | None = None) -> None:
        self.blocks, self.waits, self.gate, self.fail = blocks, set(waits), gate, fail

    def iter_batches(self, **kwargs):
        for i, block in enumerate(self.blocks):
            if i in self.waits:
                assert self.gate.wait(timeout=120), "the test never opened the gate"
            yield pa.Table.from_pylist(block)
        if self.fail is not None:
            raise self.fail


@pytest.fixture
def job(tmp_path, monkeypatch):
    """(config factory, the datasets the driver built): three local videos, rows made by `rounds`,
    one function per round from the todo list to a StandIn. No Ray: the ledger is left out."""
    (tmp_path / "in").mkdir()
    (tmp_path / "model").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "in" / f"{name}.mp4").write_bytes(b"not decoded here")
    rounds: list = []
    built: list[int] = []

    def build(config, todo, settings, ledger=None):
        built.append(len(todo))
        return rounds[len(built) - 1](todo)

    monkeypatch.setattr(pipeline.run, "_build_dataset", build)
    monkeypatch.setattr(pipeline.ledger, "start_ledger", lambda: None)

    def config(**extra):
        fields = dict(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(tmp_path / "model"))
        return load_config(**fields, num_frames=4, max_frames=8, **extra)

    return config, rounds, tmp_path / "out"


def _rows(todo, errors=()) -> list[dict]:
    return [_row(o.uri, o.etag, o.size, errors[i] if i < len(errors) else "") for i, o in enumerate(todo)]


def _parts(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_buffered_rows_are_written_after_flush_seconds_without_a_new_block(job):
    """Two blocks back to back, then none: both blocks' rows are on storage flush_seconds later, while
    the third block is still held back (the second arrived too soon after any flush to be written)."""
    config, rounds, out = job
    gate = threading.Event()
    rounds.append(lambda todo: StandIn([_rows(todo[:1]), _rows(todo[1:2]), _rows(todo[2:])], waits={2}, gate=gate))
    result: dict = {}
    runner = threading.Thread(
        target=lambda: result.update(report=run_job(config(flush_seconds=2.0, report=False), log=lambda line: None))
    )
    runner.start()
    try:
        deadline = time.monotonic() + 30  # generous: the rows are due 2 s after the first block
        while len(_parts(out)) < 2 and time.monotonic() < deadline and runner.is_alive():
            time.sleep(0.05)
        written = _parts(out)  # before the third block (the gate is still shut)
    finally:
        gate.set()
        runner.join(timeout=60)
    assert [Path(r["video_uri"]).name for r in written] == ["a.mp4", "b.mp4"]
    assert result["report"]["rows_written"] == 3
    assert len(_parts(out)) == 3


def test_no_flush_before_flush_seconds_when_blocks_keep_coming(job):
    """flush_seconds is a bound on the wait, not a timer that cuts every block into its own part."""
    config, rounds, out = job
    rounds.append(lambda todo: StandIn([_rows(todo[:1]), _rows(todo[1:2]), _rows(todo[2:])]))
    report = run_job(config(flush_seconds=600, report=False), log=lambda line: None)
    assert report["rows_written"] == 3 and len(report["parts"]) == 1


@pytest.mark.parametrize("max_rounds", [1, 2])
def test_credentials_in_errors_never_reach_rows_reports_or_logs(job, max_rounds):
    """Errors quote URLs (an endpoint with user:password@, presigned query strings): redacted in the
    error column, the round errors of the report and the log, and in JobIncomplete's message."""
    config, rounds, out = job
    lost = RuntimeError(f'ObjectLostError: fetching from "http://admin:{PASSWORD}@10.0.0.1:9000/b" failed')
    rounds.append(lambda todo: StandIn([_rows(todo[:2], errors=[ENDPOINT_ERROR, PRESIGNED_ERROR])], fail=lost))
    rounds.append(lambda todo: StandIn([_rows(todo)]))
    lines: list[str] = []
    if max_rounds == 1:
        with pytest.raises(JobIncomplete) as raised:
            run_job(config(max_rounds=1), log=lines.append)
        assert PASSWORD not in str(raised.value) and "http://***@10.0.0.1:9000/b" in str(raised.value)
    else:
        assert run_job(config(max_rounds=2), log=lines.append)["missing"] == 0
    rows = {Path(r["video_uri"]).name: r for r in _parts(out)}
    (report,) = [json.loads(p.read_text()) for p in out.glob("_report-*.json")]
    assert rows["a.mp4"]["error"] == ENDPOINT_ERROR.replace(f"admin:{PASSWORD}@", "***@")
    assert "X-Amz-Credential=***&X-Amz-Signature=***" in rows["b.mp4"]["error"]
    assert "http://***@10.0.0.1:9000/b" in report["round_errors"][0]
    assert any("round 1 stopped early: RuntimeError: ObjectLostError" in line for line in lines)
    for name, text in {
        "rows": json.dumps(rows, default=str),
        "report": json.dumps(report),
        "log": "\n".join(lines),
    }.items():
        assert PASSWORD not in text, name


def test_timed_hands_items_over_with_a_none_for_each_quiet_wait_and_raises_what_the_source_raises():
    from pipeline.run import timed

    gate = threading.Event()

    def source():
        yield 1
        assert gate.wait(timeout=60)
        yield 2
        raise ValueError("the source failed")

    got = []
    with pytest.raises(ValueError, match="the source failed"):
        for item in timed(source(), lambda: 0.01 if got else None):  # no tick before the first item
            got.append(item)
            if got.count(None) == 3:
                gate.set()
    assert got[0] == 1 and got.count(None) >= 3 and [x for x in got if x is not None] == [1, 2]
    assert list(timed(iter("abc"), lambda: None)) == ["a", "b", "c"]


def test_rows_lost_without_an_error_still_end_in_job_incomplete(job):
    """A round that ends cleanly but leaves videos without a row (the cluster dropped them silently):
    after max_rounds the job says how many are missing, instead of failing on the empty error list."""
    config, rounds, out = job
    rounds.append(lambda todo: StandIn([_rows(todo[:1])]))
    with pytest.raises(JobIncomplete, match=r"2 of 3 objects lack rows after 1 rounds \(no round reported an error\)"):
        run_job(config(max_rounds=1, report=False), log=lambda line: None)
    assert [Path(r["video_uri"]).name for r in _parts(out)] == ["a.mp4"]
