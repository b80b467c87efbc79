"""The caption actor, outside Ray: what it hands the processor (chat template, real video
metadata), that its settings take effect (adaptive block policy), and that it refuses to start
where it cannot run as asked."""

from __future__ import annotations

import pytest
import torch

import flash
from actors.caption import CaptionActor
from demo.tiny_models import QWEN_CHAT_TEMPLATE, build_qwen2_5_vl
from demo.world import FPS, FRAMES, encode_mp4, render, scene_for_seed
from pipeline.config import DEFAULT_INSTRUCTION, RAW_PROMPT, load_config
from pipeline.decode import Sampling, decode_row
from pipeline.storage import S3Settings
from tests.pipeline.test_real_checkpoint import _moving_clip


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model = build_qwen2_5_vl(root / "model", chat_template=QWEN_CHAT_TEMPLATE, seed=1)
    target = flash.load_target(model)
    flash.FlashDrafter.for_target(target).save_pretrained(root / "drafter")
    return str(model), str(root / "drafter")


def _rows(tmp_path, clips: dict[str, bytes], num_frames: int) -> list[dict]:
    rows = []
    for name, data in clips.items():
        path = tmp_path / name
        path.write_bytes(data)
        row = {"video_uri": str(path), "size": len(data), "etag": "e"}
        rows.append(decode_row(row, S3Settings(), Sampling(num_frames=num_frames, max_bytes=1 << 30)))
    assert not any(r["error"] for r in rows)
    return rows


def _actor(tmp_path, model: str, drafter: str | None = None, **settings) -> CaptionActor:
    config = load_config(
        input=str(tmp_path), output=str(tmp_path / "out"), model=model, drafter=drafter, dtype="float64", **settings
    )
    return CaptionActor(config.model_dump())


def test_processor_gets_the_chat_template_and_the_clip_metadata(tmp_path, chat_model):
    actor = _actor(tmp_path, chat_model[0])
    assert actor.prompt.startswith("<|im_start|>system\n") and actor.prompt.endswith("<|im_start|>assistant\n")
    assert DEFAULT_INSTRUCTION in actor.prompt and "<|vision_start|><|video_pad|><|vision_end|>" in actor.prompt
    rows = _rows(tmp_path, {"a.mp4": _moving_clip(90, 30, 112, 112, seed=0)}, num_frames=8)
    inputs = actor.inputs(rows)
    # 8 frames of a 3 s clip: 4 temporal patches of 2 frames, each spanning 2 x 90/8 frames at 30 fps = 0.75 s.
    assert inputs["second_per_grid_ts"].tolist() == pytest.approx([0.75])
    assert inputs["video_grid_thw"][0, 0].item() == 4


def test_demo_target_keeps_its_trained_time_positions(tmp_path):
    """The demo target (tokens_per_second 2, real metadata) sees the positions it was trained with
    (frames as bare arrays, assumed 24 fps, tokens_per_second 24): patches at time positions 0 and 2."""
    actor = _actor(tmp_path, "models/demo-target")
    assert actor.prompt == RAW_PROMPT  # no chat template: the prompt as given
    rows = _rows(tmp_path, {"d.mp4": encode_mp4(render(scene_for_seed(5)))}, num_frames=4)
    assert rows[0]["video_total_frames"] == FRAMES and rows[0]["video_fps"] == pytest.approx(FPS)
    target, inputs = actor.target, actor.inputs(rows)
    positions, _ = target._prompt_positions(target._model_inputs(inputs))  # [3 (t, h, w), B, L]
    time = positions[0, 0][inputs["input_ids"][0] == target.config.video_token_id]
    assert sorted(set((time - time.min()).tolist())) == [0, 2]


def test_adaptive_block_policy_is_used(tmp_path, chat_model):
    rows = _rows(tmp_path, {"a.mp4": _moving_clip(30, 30, 112, 112, seed=2)}, num_frames=4)
    adaptive = _actor(tmp_path, *chat_model, max_new_tokens=8)
    adaptive._generate(rows)
    assert adaptive.policy is not None and adaptive.policy.cycles > 0  # generate asked it for every block
    fixed = _actor(tmp_path, *chat_model, max_new_tokens=8, adaptive_block=False)
    assert fixed.policy is None
    assert fixed._generate(rows)[0] == adaptive._generate(rows)[0]


def test_gpus_without_cuda_fail_at_start(tmp_path, chat_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        _actor(tmp_path, chat_model[0], gpus_per_actor=1)


def test_max_rows_bounds_the_rows_decoding_and_keeps_the_captions(tmp_path, chat_model):
    import pyarrow as pa

    clips = {f"c{i}.mp4": _moving_clip(20 + 7 * i, 30, 112, 112, seed=i) for i in range(5)}
    rows = _rows(tmp_path, clips, num_frames=4)
    whole = _actor(tmp_path, *chat_model, max_new_tokens=10)._generate(rows)  # all five at once
    streaming = _actor(tmp_path, *chat_model, max_new_tokens=10, max_rows=2)
    groups = []
    inputs = streaming.inputs
    streaming.inputs = lambda group: groups.append(len(group)) or inputs(group)
    out = streaming(pa.Table.from_pylist(rows)).to_pylist()
    assert [r["caption"] for r in out] == whole[0] and [r["num_tokens"] for r in out] == whole[1]
    assert max(groups) <= 2 and sum(groups) == 5  # never more than max_rows live; every video admitted
    assert all(r["generate_s"] > 0 and r["busy_s"] == r["generate_s"] for r in out)


def test_a_row_that_breaks_the_engine_costs_only_itself(tmp_path, chat_model):
    """A row whose batch cannot be decoded fails the engine with every row in it; each of those is
    then captioned alone, so only the bad row gets an error, and the others their own captions."""
    import pyarrow as pa

    clips = {f"c{i}.mp4": _moving_clip(20 + 5 * i, 30, 112, 112, seed=i) for i in range(3)}
    rows = _rows(tmp_path, clips, num_frames=4)
    alone = [_actor(tmp_path, *chat_model, max_new_tokens=8)._generate([r])[0][0] for r in rows]
    actor = _actor(tmp_path, *chat_model, max_new_tokens=8)
    inputs = actor.inputs

    def breaking(group):
        if any(r["video_uri"].endswith("c1.mp4") for r in group):
            raise RuntimeError("this video breaks generation")
        return inputs(group)

    actor.inputs = breaking
    out = actor(pa.Table.from_pylist(rows)).to_pylist()
    assert out[1]["error"] == "caption failed: RuntimeError: this video breaks generation"
    assert [out[0]["caption"], out[2]["caption"]] == [alone[0], alone[2]] and not out[0]["error"]
    assert actor.shared.engines_opened == 1  # the failed engine was dropped; the retries ran alone


def test_batches_in_flight_together_caption_as_one_at_a_time(tmp_path, chat_model):
    """Two calls at once (Ray Data's batches_per_actor threads): each batch's processor work runs
    beside the other's decoding, their rows share the actor's engine, and the captions are the ones
    of calls made one after another."""
    import threading

    import pyarrow as pa

    clips = {f"c{i}.mp4": _moving_clip(20 + 5 * i, 30, 112, 112, seed=i) for i in range(4)}
    rows = _rows(tmp_path, clips, num_frames=4)
    batches = [pa.Table.from_pylist(rows[:2]), pa.Table.from_pylist(rows[2:])]
    actor = _actor(tmp_path, *chat_model, max_new_tokens=8)
    alone = [actor(b).column("caption").to_pylist() for b in batches]
    together: dict[int, list[str]] = {}
    threads = [
        threading.Thread(target=lambda i=i: together.update({i: actor(batches[i]).column("caption").to_pylist()}))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[0], together[1]] == alone and all(alone[0] + alone[1])
    assert actor.shared.engines_opened == 1  # one engine for every batch the actor decodes


def test_a_row_the_processor_refuses_costs_only_itself(tmp_path, chat_model):
    import pyarrow as pa

    clips = {f"c{i}.mp4": _moving_clip(20 + 5 * i, 30, 112, 112, seed=i) for i in range(3)}
    rows = _rows(tmp_path, clips, num_frames=4)
    rows[1]["frames_shape"] = [4, 112, 112, 4]  # four channels: the image processor cannot take it
    out = _actor(tmp_path, *chat_model, max_new_tokens=8)(pa.Table.from_pylist(rows)).to_pylist()
    assert out[1]["error"].startswith("processing failed:") and out[1]["caption"] == ""
    assert [bool(r["caption"]) and not r["error"] for r in (out[0], out[2])] == [True, True]


def test_compile_gives_the_same_captions_and_says_so_in_each_row(tmp_path, chat_model):
    """`compile` (aot_eager: traced, exact) captures the passes; captions equal the eager actor's, and
    the `compile` column (the report's source) says the passes ran compiled."""
    import pyarrow as pa

    clips = {f"c{i}.mp4": _moving_clip(20 + 7 * i, 30, 112, 112, seed=i) for i in range(3)}
    rows = _rows(tmp_path, clips, num_frames=4)
    eager = _actor(tmp_path, *chat_model, max_new_tokens=10)
    compiled = _actor(tmp_path, *chat_model, max_new_tokens=10, compile=True, compile_backend="aot_eager")
    assert compiled._generate(rows)[:2] == eager._generate(rows)[:2]  # captions and token counts
    assert compiled.compile_status == {"active": True, "fallback": None}
    assert set(compiled.target._passes) == {"aot_eager"}  # compile_backend chose the backend
    table = compiled(pa.Table.from_pylist([dict(r) for r in rows]))
    assert set(table.column("compile").to_pylist()) == {"active"}
    assert set(eager(pa.Table.from_pylist([dict(r) for r in rows])).column("compile").to_pylist()) == {""}


def test_suffix_decoding_learns_across_batches_and_keeps_the_captions(tmp_path):
    """`--drafter suffix`: the actor's store grows with every caption it writes, so later batches
    accept more; captions equal plain decoding's."""
    import pyarrow as pa

    clips = {f"c{s}.mp4": encode_mp4(render(scene_for_seed(s))) for s in range(100, 116)}
    rows = _rows(tmp_path, clips, num_frames=4)
    suffix = _actor(tmp_path, "models/demo-target", "suffix", max_new_tokens=64)
    plain = _actor(tmp_path, "models/demo-target", None, max_new_tokens=64)
    first = suffix(pa.Table.from_pylist(rows[:8])).to_pylist()
    second = suffix(pa.Table.from_pylist(rows[8:])).to_pylist()
    want = plain(pa.Table.from_pylist(rows)).to_pylist()
    assert [r["caption"] for r in first + second] == [r["caption"] for r in want]
    assert all(r["drafter"] == "suffix" for r in first) and suffix.drafter.store.added == 16
    accepted = sum(r["num_tokens"] - r["num_tokens"] / r["acceptance_length"] for r in second)
    assert 0 < sum(r["suffix_tokens"] for r in second) <= round(accepted)
    assert all(r["suffix_tokens"] == 0 for r in want)
    mean = [sum(r["acceptance_length"] for r in rs) / len(rs) for rs in (first, second)]
    assert mean[1] > mean[0] > 1.0
    # A rerun's actor starts from the captions the output holds: no cold start.
    from pipeline.storage import OutputStore, S3Settings

    OutputStore(str(tmp_path / "out"), S3Settings()).write_part(
        [{k: v for k, v in r.items() if k not in ("actor", "busy_s", "rss_mb", "compile")} for r in want],
        "part-a.parquet",
    )
    rerun = _actor(tmp_path, "models/demo-target", "suffix", max_new_tokens=64)
    assert rerun.drafter.store.added == 16
    again = rerun(pa.Table.from_pylist(rows[:8])).to_pylist()
    assert [r["caption"] for r in again] == [r["caption"] for r in want[:8]]
    assert sum(r["acceptance_length"] for r in again) / 8 > mean[0]


def test_an_actor_refuses_a_target_its_gpus_cannot_hold_before_loading_it(tmp_path, tiny_checkpoints, monkeypatch):
    """On a GPU node the actor plans the placement first: a target too big for its GPUs is refused with
    the sizes, and no weight is read. (No GPU here: CUDA's presence and its memory are what is faked.)"""
    from types import SimpleNamespace

    import flash
    from flash.placement import TargetDoesNotFit

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=2**20))
    loaded = []
    monkeypatch.setattr(flash, "load_target", lambda *a, **k: loaded.append(a))
    with pytest.raises(TargetDoesNotFit, match=r"does not fit 2 GPU\(s\) of 0\.0 GiB: it needs .* float64 weights"):
        _actor(tmp_path, tiny_checkpoints["qwen2_5_vl"], gpus_per_actor=2)
    assert loaded == []
