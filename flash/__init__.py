"""FLASH: latent-aware, semi-autoregressive speculative decoding for Hugging Face VLMs.

target = flash.load_target(path)
drafter = flash.FlashDrafter.for_target(target, flash.DrafterConfig())
out = flash.generate(target, drafter, target.processor(text=[...], videos=[...], return_tensors="pt"))

Many requests, at most R decoding at once (continuous batching):
engine = flash.Engine(target, drafter, max_new_tokens=512)
keys = engine.run(count, inputs_for, max_rows=R)   # inputs_for(indices) -> a processor batch
"""

from flash.drafter import Block, DrafterConfig, FlashDrafter
from flash.generate import DecodeStats, Engine, GenerateOutput, generate
from flash.policy import BlockPolicy
from flash.sampling import SamplingParams
from flash.target import Prefill, Target, TargetHead, TargetSession, load_target, load_target_head

__all__ = [
    "Block",
    "BlockPolicy",
    "DecodeStats",
    "DrafterConfig",
    "Engine",
    "FlashDrafter",
    "GenerateOutput",
    "Prefill",
    "SamplingParams",
    "Target",
    "TargetSession",
    "generate",
    "load_target",
    "load_target_head",
    "TargetHead",
]
