"""Fault injection for the reliability tests; inert unless FLASHCAP_FAULTS_FILE
names a file that exists.

The file holds JSON rules, read on every call so a test can change them while
a Ray cluster is up (workers inherit the variable, not the file's contents):

    [{"stage": "caption", "match": "poison", "times": -1},
     {"stage": "decode", "match": "clip_000003", "times": 1}]

A rule kills the worker process (os._exit, as an out-of-memory kill or a
segfault would) when a row whose video_uri contains `match` reaches `stage`;
`times` bounds how often per video across all processes (-1: every time),
counted with marker files beside the rules file. A rule with `delay_s` sleeps
that long instead of killing (a slow worker, for tests that act mid-job); one with `raise` raises
a RuntimeError with that message instead (a device failure, for the caption actor's handling).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

ENV = "FLASHCAP_FAULTS_FILE"


def _rules() -> tuple[Path, list[dict]] | None:
    name = os.environ.get(ENV)
    if not name:
        return None
    path = Path(name)
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _claim(marker_dir: Path, uri: str, stage: str, times: int) -> bool:
    """True if this hit is within the rule's budget (and records it)."""
    if times < 0:
        return True
    digest = hashlib.sha1(f"{stage}:{uri}".encode()).hexdigest()[:16]
    for i in range(times):
        try:
            os.close(os.open(marker_dir / f"{digest}-{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            continue
    return False


def maybe_crash(stage: str, rows: list[dict]) -> None:
    loaded = _rules()
    if loaded is None:
        return
    path, rules = loaded
    markers = path.parent / (path.name + ".hits")
    markers.mkdir(exist_ok=True)
    for rule in rules:
        if rule.get("stage") != stage:
            continue
        for r in rows:
            uri = str(r["video_uri"])
            if rule["match"] in uri and _claim(markers, uri, stage, int(rule.get("times", -1))):
                if "delay_s" in rule:
                    time.sleep(float(rule["delay_s"]))
                    break
                if "raise" in rule:  # an error raised where the stage runs (e.g. a CUDA error message)
                    raise RuntimeError(rule["raise"])
                os._exit(77)
