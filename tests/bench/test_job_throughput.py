"""bench.job_throughput's caption check, on hand-written tables: every run is compared with the other
side's reference run, so a difference between FLASH and plain decoding marks both sides."""

from __future__ import annotations

from bench.job_throughput import agreement, identical_fractions

PLAIN = {"a.mp4": "a red ball", "b.mp4": "a blue cube"}
OFF_BY_ONE_CLIP = {"a.mp4": "a red ball", "b.mp4": "a blue ball"}
SETTINGS = [(4, 2), (16, 2)]


def _runs(flash: dict[str, str], target: dict[str, str]) -> dict:
    return {(method, *s): table for s in SETTINGS for method, table in (("flash", flash), ("target", target))}


def test_identical_sides_agree_everywhere():
    assert identical_fractions(_runs(PLAIN, dict(PLAIN)), SETTINGS[0]) == {run: 1.0 for run in _runs(PLAIN, PLAIN)}


def test_a_difference_between_the_sides_marks_every_run_on_both_sides():
    fractions = identical_fractions(_runs(OFF_BY_ONE_CLIP, PLAIN), SETTINGS[0])
    assert fractions == {run: 0.5 for run in _runs(PLAIN, PLAIN)}  # the plain reference run included


def test_only_the_run_that_differs_from_the_other_side_is_marked():
    runs = _runs(PLAIN, PLAIN) | {("flash", 16, 2): OFF_BY_ONE_CLIP}
    fractions = identical_fractions(runs, SETTINGS[0])
    assert fractions[("flash", 16, 2)] == 0.5
    assert [f for run, f in fractions.items() if run != ("flash", 16, 2)] == [1.0] * 3


def test_agreement_counts_clips_missing_from_either_table():
    assert agreement(PLAIN, PLAIN) == 1.0
    assert agreement({"a.mp4": "a red ball"}, PLAIN) == 0.5
    assert agreement(PLAIN | {"c.mp4": "a green cone"}, PLAIN) == 2 / 3
    assert agreement({}, {}) == 0.0
