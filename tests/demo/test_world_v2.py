"""Demo world v2: long, time-ordered captions that say what the frames show, and the clause scorer
that reads them back."""

from __future__ import annotations

import numpy as np

from demo.world import COLOURS
from demo.world_v2 import (
    FPS,
    SIDE,
    SIZES,
    clause_accuracy,
    clause_summary,
    clip_for_seed,
    facts,
    render,
    vocabulary,
    write_videos,
)
from pipeline.decode import decode_video


def test_captions_are_long_ordered_and_read_back_exactly():
    vocab, lengths = set(vocabulary()), []
    for seed in range(400):
        clip = clip_for_seed(seed)
        caption = clip.caption()
        assert caption == clip_for_seed(seed).caption()  # deterministic per seed
        assert set(caption.split()) <= vocab
        lengths.append(len(caption.split()))
        got = facts(caption)
        assert len(got["events"]) == len(clip.events) and "?" not in got["events"]
        assert 4 <= len(clip.events) <= 6 and 4 <= clip.seconds <= 8
        score = clause_accuracy(caption, caption)
        assert score["right"] == score["total"]
    assert np.percentile(lengths, 50) >= 100 and max(lengths) <= 200


def test_the_scorer_counts_a_wrong_fact_or_order_as_wrong():
    caption = clip_for_seed(7).caption()
    score = clause_accuracy(caption, caption)
    swapped = caption.replace("green", "purple")
    assert clause_accuracy(swapped, caption)["right"] == score["right"] - 2  # at first, at the end
    sentences = caption.split(" . ")
    reordered = " . ".join([sentences[0], sentences[2], sentences[1], *sentences[3:]])
    assert clause_accuracy(reordered.replace("later", "then", 1), caption)["events_right"] < score["events_right"]
    assert clause_accuracy("the video .", caption)["right"] == 0


def test_the_scorer_says_which_attribute_or_order_is_wrong():
    caption = clip_for_seed(7).caption()
    score = clause_accuracy(caption, caption)
    objects = score["attributes"]
    assert objects == len(facts(caption)["first"]) + len(facts(caption)["last"]) > 0
    assert all(score[a] == objects for a in ("size", "colour", "shape", "place"))
    assert score["events_found"] == score["events_right"] == score["events"]
    head, rest = caption.split(" : ", 1)
    first_colour = rest.split()[2]
    other = next(c for c in COLOURS if c not in caption.split())
    recoloured = clause_accuracy(f"{head} : {rest.replace(first_colour, other, 1)}", caption)
    assert recoloured["colour"] == objects - 1
    assert all(recoloured[a] == objects for a in ("size", "shape", "place"))
    sentences = caption.split(" . ")
    reordered = clause_accuracy(" . ".join([sentences[0], sentences[2], sentences[1], *sentences[3:]]), caption)
    assert reordered["events_found"] == score["events"] and reordered["events_right"] < score["events"]
    dropped = clause_accuracy(" . ".join([sentences[0], *sentences[2:]]), caption)
    assert dropped["events_found"] == score["events"] - 1
    total = {k: score[k] + recoloured[k] for k in score}
    summary = clause_summary(total)
    assert (
        abs(summary["colour"] - (2 * objects - 1) / (2 * objects)) < 1e-3
        and summary["shape"] == summary["background"] == 1
    )


def test_the_last_frame_shows_the_objects_the_caption_ends_with():
    for seed in range(40):
        clip = clip_for_seed(seed)
        frame = render(clip, only=[clip.frames - 1])[0]
        for thing in [t for t in clip.states()[-1] if t is not None]:
            cx, cy = SIDE / 3 * (thing.col + 0.5), SIDE / 3 * (thing.row + 0.5)
            # The cell's centre column of pixels holds the object's colour (every shape covers its centre).
            assert tuple(frame[int(cy), int(cx)]) == COLOURS[thing.colour], (seed, thing)
            if thing.shape != "triangle":  # the others span their whole size across their centre
                width = int((frame[int(cy)] == COLOURS[thing.colour]).all(axis=-1).sum())
                assert abs(width - SIZES[thing.size]) <= 2, (seed, thing, width)


def test_clips_are_real_h264_files_of_four_to_eight_seconds(tmp_path):
    records = write_videos(tmp_path, 3, seed=20)
    for r in records:
        frames, info = decode_video((tmp_path / r["file"]).read_bytes(), 16, 448, None, 64)
        clip = clip_for_seed(r["seed"])
        assert frames.shape == (16, SIDE, SIDE, 3) and info.total_frames == clip.frames
        assert abs(info.fps - FPS) < 0.01 and r["facts"] == facts(r["caption"])


def test_the_v2_job_settings_match_the_world(tmp_path):
    from pathlib import Path

    from demo.world_v2 import PROMPT
    from pipeline.config import load_config

    path = Path(__file__).resolve().parents[2] / "jobs" / "demo_v2.yaml"
    config = load_config(str(path), input=str(tmp_path), output=str(tmp_path / "out"), model="models/demo-target")
    assert config.prompt == PROMPT and config.max_new_tokens == 200


def test_make_demo_videos_writes_the_v2_world(tmp_path):
    import json

    from demo.make_videos import main

    main(["--world", "v2", "--out", str(tmp_path), "--count", "2", "--seed", "5"])
    records = [json.loads(line) for line in (tmp_path / "captions.jsonl").open()]
    assert [r["caption"] for r in records] == [clip_for_seed(s).caption() for s in (5, 6)]
