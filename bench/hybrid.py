"""The price of rolling back linear attention (Qwen3.5), measured in one run on checkpoints built
here (random weights; costs do not depend on the values):

    python -m bench.hybrid [--hidden 256] [--layers 8] [--batch-sizes 1,8] [--block 5] [--out F]

For a hybrid Qwen3.5 (3 of 4 layers gated-DeltaNet linear attention, as the releases) and a
same-size target whose layers are all full attention:
- `step_ms`: one plain decoding step (verify 1 token + commit);
- `verify_ms`: verify a block of block+1 tokens and commit a ragged acceptance (flashcap's design:
  the recurrence stepped token by token, each row restored to its own length);
- `recompute_ms` (hybrid only): the alternative design, timed from its parts: verify the block with
  Hugging Face's chunked rule (no per-position states), then run the accepted tokens again from the
  last committed state to rebuild it;
- and FLASH with an oracle drafter (right for `--right` slots per block) against plain decoding on
  the same prompts, outputs checked identical, for both families (Qwen3-VL too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

import flash
from bench.oracle import OracleDrafter
from demo.tiny_models import build_qwen3_5, build_qwen3_vl

PROMPT = (
    "<|im_start|>user <|vision_start|><|video_pad|><|vision_end|> describe the video<|im_end|><|im_start|>assistant"
)


def _inputs(target, batch: int, seed: int = 0):
    from transformers.video_utils import VideoMetadata

    rng = np.random.RandomState(seed)
    videos = [rng.randint(0, 256, (4, 64, 64, 3), dtype=np.uint8) for _ in range(batch)]
    meta = [VideoMetadata(total_num_frames=4, fps=2.0, frames_indices=[0, 1, 2, 3]) for _ in range(batch)]
    return target.processor(
        text=[PROMPT] * batch, videos=videos, video_metadata=meta, do_sample_frames=False, return_tensors="pt"
    )


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def cycle_costs(target, batch: int, block: int, repeats: int) -> dict:
    """ms per plain step, per verify+commit of a block (ragged acceptance), and for a hybrid target the
    recompute design's parts."""
    inputs = _inputs(target, batch)
    session, _ = target.prefill(inputs)
    width = block + 1
    tokens = torch.randint(10, target.vocab_size - 1, (batch, width))
    accepted = torch.arange(batch) % width + 1  # ragged: rows keep 1..width tokens

    def plain():
        session.verify(tokens[:, :1])
        session.commit(torch.ones(batch, dtype=torch.long), kept_max=1)

    def verify():
        session.verify(tokens)
        session.commit(accepted, kept_max=int(accepted.max()))

    out = {"step_ms": _timed(plain, repeats), "verify_ms": _timed(verify, repeats)}
    if session.linear is not None:
        linear, session.linear = session.linear, None  # Hugging Face's own path: chunked rule, no states kept

        most = int(accepted.max())

        def recompute():
            session.verify(tokens)  # the block, for its logits
            session.commit(torch.zeros(batch, dtype=torch.long), kept_max=0)  # back to the committed state
            session.verify(tokens[:, :most])  # the accepted tokens again, to rebuild the state
            session.commit(accepted, kept_max=most)
            for i in linear.layers:
                session.cache.layers[i].crop(0)  # the convolution window back to its kernel size

        out["recompute_ms"] = _timed(recompute, repeats)
    return out


def oracle_speed(target, batch: int, block: int, right: int, max_new: int, repeats: int) -> dict:
    inputs = _inputs(target, batch, seed=1)
    reference = flash.generate(target, None, inputs, max_new_tokens=max_new, temperature=0).sequences
    drafter = OracleDrafter(reference, target.vocab_size, block, right_for=right)
    times = {"plain": [], "flash": []}
    same = True
    for _ in range(repeats):
        for side in ("plain", "flash"):
            start = time.perf_counter()
            out = flash.generate(
                target, drafter if side == "flash" else None, inputs, max_new_tokens=max_new, temperature=0
            )
            times[side].append(time.perf_counter() - start)
            same &= out.sequences == reference
            drafter = OracleDrafter(reference, target.vocab_size, block, right_for=right)
    plain, fast = statistics.median(times["plain"]), statistics.median(times["flash"])
    return {"plain_s": plain, "flash_s": fast, "speedup": plain / fast, "identical": same}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--right", type=int, default=3, help="oracle: right drafts per block")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    sizes = dict(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=args.hidden // 4,
        intermediate_size=3 * args.hidden,
    )
    root = Path(tempfile.mkdtemp(prefix="flashcap-hybrid-"))
    targets = {
        "qwen3_5 (hybrid, 3 of 4 layers linear)": build_qwen3_5(root / "hybrid", full_attention_interval=4, **sizes),
        "qwen3_5 (all full attention)": build_qwen3_5(root / "full", full_attention_interval=1, **sizes),
        "qwen3_vl": build_qwen3_vl(root / "qwen3_vl", **sizes),
    }
    rows = []
    for name, path in targets.items():
        target = flash.load_target(path)
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            row = {"target": name, "batch_size": batch, **cycle_costs(target, batch, args.block, args.repeats)}
            row["oracle"] = oracle_speed(target, batch, args.block, args.right, args.max_new_tokens, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "date": date.today().isoformat(),
        "what": "random-weight checkpoints built here; float32 CPU unless run elsewhere",
        "sizes": sizes,
        "block": args.block,
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
