"""What a verify of k+1 tokens costs on a mixture-of-experts target, against a one-token step.

A verify routes each of its (k+1) x batch tokens to its own experts: at batch 1 it reads up to k+1
times the expert weights of a decoding step, so "one pass for several tokens" buys less than on a
dense target. Three parts, one run:

1. Measured (here: this CPU; with --device cuda on a lent GPU): a random-weight Qwen3-VL-MoE text
   model and a dense Qwen3-VL of the same active size (dense MLP = experts_per_token x expert
   width), verify of 1, 2, 3, 5 tokens per row over a loaded prompt at each batch size, alternating
   the two models; the distinct experts each pass routed to, counted at every sparse layer.
2. Modelled at a released shape (default Qwen3-VL-30B-A3B: 128 experts, 8 active, 48 layers,
   against Qwen2.5-VL-7B dense): expected distinct experts of n tokens, E (1 - (1 - a/E)^n) for
   uniform routing, and a roofline pass time max(bytes / bandwidth, flops / peak) with the weights
   the pass reads (dense parts, distinct experts, LM head) and the rows' KV cache.
3. The block length flashcap's adaptive policy (flash.policy.BlockPolicy) settles on when it learns
   from those costs, per batch size, beside the rate-optimal length.

    python -m bench.moe_verify [--batch-sizes 1,8,64] [--repeats 5] [--device cpu] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date
from pathlib import Path

import torch

import flash
from flash.policy import BlockPolicy, expected_tokens

WIDTHS = (1, 2, 3, 5)  # tokens a row per pass: a decoding step, then verifies of k = 1, 2, 4
# Peak figures of an H100 SXM (bfloat16 dense tensor cores, HBM3): a roofline, not a promise.
H100 = {"bandwidth": 3.35e12, "flops": 989e12}


def distinct_experts(tokens: float, experts: int, active: int) -> float:
    """Expected distinct experts `tokens` tokens route to, each picking `active` of `experts` at random."""
    return experts * (1 - (1 - active / experts) ** tokens)


def tiny_pair(hidden: int, layers: int, experts: int, active: int, expert: int, device: str, dtype: torch.dtype):
    """(MoE target, dense target): Qwen3-VL-MoE and Qwen3-VL text models of equal active size."""
    import transformers

    text = dict(
        vocab_size=4096,
        eos_token_id=2,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        head_dim=64,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": [16, 8, 8],
            "mrope_interleaved": True,
        },
    )
    vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden)
    moe = transformers.Qwen3VLMoeConfig(
        text_config=dict(text, num_experts=experts, num_experts_per_tok=active, moe_intermediate_size=expert,
                         intermediate_size=active * expert, decoder_sparse_step=1, norm_topk_prob=True),
        vision_config=vision,
    )  # fmt: skip
    dense = transformers.Qwen3VLConfig(text_config=dict(text, intermediate_size=active * expert), vision_config=vision)
    out = []
    for config, cls in ((moe, "Qwen3VLMoeForConditionalGeneration"), (dense, "Qwen3VLForConditionalGeneration")):
        torch.manual_seed(0)
        with torch.device(device):
            model = getattr(transformers, cls)(config).to(dtype).eval()
        model.requires_grad_(False)
        out.append(flash.Target(model, None, "qwen", f"random:{config.model_type}"))
    return out


class ExpertCounter:
    """Distinct experts each pass routes to, per sparse layer (hooks on the routers' outputs)."""

    def __init__(self, target: flash.Target) -> None:
        self.seen: list[set[int]] = []
        self.handles = [
            module.register_forward_hook(self._hook)
            for name, module in target.model.named_modules()
            if name.endswith("mlp.gate") and "visual" not in name
        ]

    def _hook(self, module, args, output) -> None:
        indices = output[-1] if isinstance(output, tuple) else output.topk(module.top_k, dim=-1).indices
        self.seen.append(set(indices.flatten().tolist()))

    def take(self) -> float:
        mean = statistics.mean(len(s) for s in self.seen) if self.seen else 0.0
        self.seen = []
        return mean


def _session(target: flash.Target, batch: int, prompt: int):
    ids = torch.randint(0, 4000, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    inputs = {"input_ids": ids.to(target.device), "attention_mask": torch.ones_like(ids).to(target.device)}
    prompt_cache, _ = target.prompt(inputs)
    session = target.open(batch, extra=64)
    session.load(list(range(batch)), prompt_cache)
    return session


def _time_pass(session, width: int, device: torch.device) -> float:
    tokens = torch.randint(0, 4000, (session.bucket, width), generator=torch.Generator().manual_seed(width))
    tokens = tokens.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    session.verify(tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    session.commit(torch.zeros(session.bucket, dtype=torch.long, device=device), kept_max=0)  # nothing kept
    return seconds


def measure(pair, batches: list[int], repeats: int, prompt: int) -> list[dict]:
    """Median seconds of a pass of each width, per model and batch size, the models alternating."""
    rows = []
    counter = ExpertCounter(pair[0])
    for batch in batches:
        sessions = [_session(t, batch, prompt) for t in pair]
        times = {(m, w): [] for m in range(2) for w in WIDTHS}
        experts = {w: [] for w in WIDTHS}
        for _ in range(repeats + 1):  # the first round warms up
            for width in WIDTHS:
                for m, (target, session) in enumerate(zip(pair, sessions)):
                    times[m, width].append(_time_pass(session, width, target.device))
                    if m == 0:
                        experts[width].append(counter.take())
        for width in WIDTHS:
            moe, dense = (statistics.median(times[m, width][1:]) for m in range(2))
            rows.append(dict(batch=batch, width=width, moe_ms=1000 * moe, dense_ms=1000 * dense,
                             moe_experts=statistics.mean(experts[width][1:])))  # fmt: skip
    for row in rows:
        step = next(r for r in rows if r["batch"] == row["batch"] and r["width"] == 1)
        row["moe_vs_step"] = row["moe_ms"] / step["moe_ms"]
        row["dense_vs_step"] = row["dense_ms"] / step["dense_ms"]
    return rows


def shape_costs(name: str) -> dict:
    """Bytes and parameters of a released target's text model, from its meta-device model: the dense
    parts a pass reads whole, one expert of one layer, the LM head, the KV cache per token of context."""
    from demo.release_configs import release_config
    from flash.placement import layer_cache_bytes, meta_model

    config = release_config(name)
    model = meta_model(config, torch.bfloat16)
    text = config.get_text_config()
    experts = getattr(text, "num_experts", 0) or 0
    routed = dense = 0
    for pname, p in model.model.language_model.named_parameters():
        if "embed_tokens" in pname:
            continue  # a pass reads one row a token
        if ".experts." in pname:
            routed += p.numel()
        else:
            dense += p.numel()
    head = model.lm_head.weight.numel()
    kv_per_token = sum(layer_cache_bytes(config, 1, 1, torch.bfloat16))
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return dict(
        name=name,
        layers=text.num_hidden_layers,
        experts=experts,
        active=getattr(text, "num_experts_per_tok", 0) or 0,
        expert_params=routed // (experts * text.num_hidden_layers) if experts else 0,
        dense_params=dense + head,
        kv_bytes_per_token=kv_per_token,
        q_width=text.num_attention_heads * head_dim,
        hidden=text.hidden_size,
        head_params=head,
    )


def pass_seconds(shape: dict, batch: int, width: int, context: int, card: dict = H100) -> float:
    """Roofline time of a pass of `width` tokens for each of `batch` rows over `context` cached tokens."""
    tokens = batch * width
    experts = distinct_experts(tokens, shape["experts"], shape["active"]) if shape["experts"] else 0.0
    weights = shape["dense_params"] + shape["layers"] * experts * shape["expert_params"]
    read = 2 * weights + batch * context * shape["kv_bytes_per_token"]
    active = shape["dense_params"] + shape["layers"] * shape["active"] * shape["expert_params"]
    flops = 2 * tokens * active + 4 * tokens * context * shape["q_width"] * shape["layers"]
    return max(read / card["bandwidth"], flops / card["flops"])


def draft_seconds(shape: dict, card: dict = H100) -> float:
    """A FLASH drafter's pass: one dense layer of the target's width (attention 4 d^2, MLP 12 d^2)
    and the LM head, read once a cycle (the drafter proposes a block in one pass)."""
    return 2 * (16 * shape["hidden"] ** 2 + shape["head_params"]) / card["bandwidth"]


def policy_choice(verify, draft: float, alpha: float, cycles: int = 400, seed: int = 0) -> tuple[int, int, float]:
    """(the block length BlockPolicy settles on, the rate-optimal one, the settled one's tokens/s over
    the best's) at one batch size, when every drafted token is right with probability `alpha` once
    those before it were, and a cycle costs `draft` + verify(k + 1) seconds."""
    import random

    rng = random.Random(seed)
    policy = BlockPolicy(max_block=4, explore_every=16)
    picks = []
    for _ in range(cycles):
        k = policy.choose(1)
        accepted = 0
        while accepted < k and rng.random() < alpha:
            accepted += 1
        policy.observe(1, k, draft if k else 0.0, verify(k + 1), [accepted])
        picks.append(k)
    settled = max(range(5), key=lambda k: picks[-100:].count(k))
    rates = [expected_tokens([alpha] * 4, k) / ((draft if k else 0.0) + verify(k + 1)) for k in range(5)]
    best = max(range(5), key=lambda k: rates[k])
    return settled, best, rates[settled] / rates[best]


def modelled(names: list[str], batches: list[int], context: int, alphas: list[float]) -> list[dict]:
    rows = []
    for name in names:
        shape = shape_costs(name)
        for batch in batches:
            step = pass_seconds(shape, batch, 1, context)
            row = dict(target=name, batch=batch, step_ms=1000 * step)
            for width in WIDTHS:
                row[f"verify{width}_vs_step"] = pass_seconds(shape, batch, width, context) / step
                if shape["experts"]:
                    row[f"experts{width}"] = distinct_experts(width * batch, shape["experts"], shape["active"])
            for alpha in alphas:
                row[f"policy_k_a{alpha}"], row[f"best_k_a{alpha}"], row[f"policy_rate_a{alpha}"] = policy_choice(
                    lambda w, s=shape, b=batch: pass_seconds(s, b, w, context), draft_seconds(shape), alpha
                )
            rows.append(row)
    return rows


def _table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.2f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--active", type=int, default=4)
    p.add_argument("--expert-width", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--context", type=int, default=2048, help="cached tokens per row in the model (a video prompt)")
    p.add_argument("--alphas", default="0.6,0.8")
    p.add_argument("--shapes", default="Qwen3-VL-30B-A3B-Instruct,Qwen2.5-VL-7B-Instruct")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    dtype = getattr(torch, args.dtype)
    pair = tiny_pair(args.hidden, args.layers, args.experts, args.active, args.expert_width, args.device, dtype)
    measured = measure(pair, batches, args.repeats, args.prompt_tokens)
    alphas = [float(a) for a in args.alphas.split(",")]
    model = modelled(args.shapes.split(","), batches, args.context, alphas)
    print(f"## Measured ({args.device}, {args.dtype}): MoE {args.experts} experts top-{args.active} vs dense\n")
    print(_table(measured, ["batch", "width", "moe_ms", "dense_ms", "moe_vs_step", "dense_vs_step", "moe_experts"]))
    print(f"\n## Modelled (H100 roofline, context {args.context})\n")
    keys = ["target", "batch", "step_ms", "experts1", "experts2", "experts5", "verify2_vs_step", "verify5_vs_step"]
    keys += [f"{kind}_a{a}" for a in alphas for kind in ("policy_k", "best_k", "policy_rate")]
    print(_table(model, keys))
    if args.out:
        setup = {k: v for k, v in vars(args).items() if k != "out"}
        result = dict(date=str(date.today()), setup=setup, measured=measured, modelled=model)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
