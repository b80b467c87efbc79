"""What one drafter-training example costs at a target's real shape: the teacher-forced pass, the
loss through the LM head (draft vocabulary), backward and the optimizer step, on synthetic
features (random embedding and head of the target's size: the cost does not depend on the values).

    python -m bench.train_step [--hidden 3584] [--vocab 152064] [--draft-vocab 32768]
        [--visual 1024] [--prompt-text 40] [--answer 200] [--block-size 5] [--device cuda] [--out F]

Defaults: Qwen2.5-VL-7B (hidden 3,584, vocab 152,064) with 8 frames at 448x448 (1,024 visual
tokens) and a 200-token caption. It prints seconds per example, the matmul FLOPs the formula in
docs/training.md counts, and the throughput that implies; with those, drafter training costs

    GPU-seconds = steps x batch x workers x seconds_per_example
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import flash
from demo.tiny_models import QWEN2_5_VL_7B_TEXT
from flash.train import DistillExample, drafter_loss


class _Config:
    def __init__(self, hidden: int, vocab: int, heads: int) -> None:
        self.hidden_size, self.vocab_size, self.num_attention_heads = hidden, vocab, heads
        self.model_type = "qwen2_5_vl"

    def get_text_config(self):
        return self


def synthetic_head(hidden: int, vocab: int, heads: int, device: str, dtype: torch.dtype) -> flash.TargetHead:
    with torch.device(device):
        embed = nn.Embedding(vocab, hidden).to(dtype).requires_grad_(False)
        head = nn.Linear(hidden, vocab, bias=False).to(dtype).requires_grad_(False)
    return flash.TargetHead(_Config(hidden, vocab, heads), embed, head, [vocab - 1])


def synthetic_example(hidden: int, vocab: int, visual: int, text: int, answer: int) -> DistillExample:
    g = torch.Generator().manual_seed(0)
    length = text + visual + answer
    ids = torch.randint(0, vocab, (length,), generator=g)
    mask = torch.zeros(length, dtype=torch.bool)
    mask[4 : 4 + visual] = True
    return DistillExample(ids, torch.randn(length, hidden, generator=g), mask, text + visual)


def matmul_flops(cfg: flash.DrafterConfig, text_rows: int, trained_rows: int, n_latents: int) -> float:
    """Forward+backward matmul FLOPs of one example (6 x multiply-adds of the weights it touches):
    the drafter layer over latents, every text row and the k-1 block slots of each trained row,
    and the LM head (draft vocabulary) over the k slots of each trained row."""
    d = cfg.hidden_size
    inter = cfg.intermediate_size or 2 * d
    layer = cfg.num_layers * (4 * d * d + 3 * d * inter) + 2 * d * d  # attention, MLP, fuse
    tokens = n_latents + text_rows + trained_rows * (cfg.block_size - 1)
    head = trained_rows * cfg.block_size * d * (cfg.draft_vocab_size or cfg.vocab_size)
    return 6.0 * (tokens * layer + head)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=QWEN2_5_VL_7B_TEXT["hidden_size"])
    p.add_argument("--vocab", type=int, default=QWEN2_5_VL_7B_TEXT["vocab_size"])
    p.add_argument("--heads", type=int, default=QWEN2_5_VL_7B_TEXT["num_attention_heads"])
    p.add_argument("--draft-vocab", type=int, default=32768, help="0: the whole vocabulary")
    p.add_argument("--visual", type=int, default=1024, help="visual tokens in the prompt")
    p.add_argument("--prompt-text", type=int, default=40)
    p.add_argument("--answer", type=int, default=200)
    p.add_argument("--block-size", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out")
    args = p.parse_args(argv)

    on_gpu = args.device.startswith("cuda")
    head = synthetic_head(args.hidden, args.vocab, args.heads, args.device, torch.bfloat16 if on_gpu else torch.float32)
    cfg = flash.DrafterConfig(block_size=args.block_size, draft_vocab_size=args.draft_vocab)
    ids = torch.arange(args.draft_vocab) if args.draft_vocab else None
    drafter = flash.FlashDrafter.for_target(head, cfg, ids).float().train()
    opt = torch.optim.AdamW(drafter.parameters(), lr=1e-4)
    example = synthetic_example(args.hidden, args.vocab, args.visual, args.prompt_text, args.answer)
    times = []
    for rep in range(args.repeats + 1):  # the first warms up
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False):
            loss, _ = drafter_loss(drafter, example)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        if rep:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    flops = matmul_flops(
        drafter.config, args.prompt_text + args.answer, args.answer + 1, drafter.config.num_latents(args.visual)
    )
    report = {
        "device": torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads)",
        "shape": {k: getattr(args, k) for k in ("hidden", "vocab", "draft_vocab", "visual", "prompt_text", "answer")},
        "block_size": args.block_size,
        "drafter_parameters": sum(p.numel() for p in drafter.parameters() if p.requires_grad),
        "seconds_per_example": seconds,
        "spread": [min(times), max(times)],
        "matmul_tflop_per_example": flops / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
