"""Suffix decoding: the counted tries, what a row is proposed (longest match, most frequent
continuation, length by match and probability), bounded memory, and on the demo target: lossless
(float64, batched, sampling), learning from finished captions across engines, a row with nothing
to match decoding plainly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import flash
from demo.world import PROMPT, decode_frames, encode_mp4, model_inputs, render, scene_for_seed
from flash.suffix import _NO_TOKEN, SuffixDrafter, SuffixStore, SuffixTrie, WithSuffix, _Row

TARGET = Path(__file__).resolve().parents[2] / "models" / "demo-target"


def warm_store(sequences: list[list[int]]) -> SuffixStore:
    store = SuffixStore()
    for tokens in sequences:
        store.add(tokens)
    return store


def test_the_trie_counts_every_substring_up_to_its_depth():
    trie = SuffixTrie(depth=3)
    trie.add([1, 2, 3, 1, 2, 4])
    root = trie.root[1]
    assert root[1][0] == 2 and root[2][0] == 2 and root[3][0] == 1
    assert root[1][1][2][0] == 2 and root[1][1][2][1][3][0] == 1 and root[1][1][2][1][4][0] == 1
    assert all(not node[1] for node in root[1][1][2][1].values())  # depth 3: no deeper
    trie.add([1, 2, 3, 1, 2, 4], sign=-1)
    assert trie.root[1] == {} and trie.nodes == 0


def test_a_placeholder_breaks_every_path():
    trie = SuffixTrie(depth=4)
    trie.add([5, 6, _NO_TOKEN, 7])
    assert set(trie.root[1]) == {5, 6, 7} and 7 not in trie.root[1][6][1]


def test_proposals_follow_the_longest_match_and_the_most_frequent_continuation():
    store = warm_store([[9, 1, 2, 3, 4, 5], [9, 1, 2, 3, 4, 5], [8, 1, 2, 7, 7, 7]])
    drafter = SuffixDrafter(store, block_size=8, max_match=8, min_prob=0.1)
    row = _Row([40, 41], 9, depth=24)
    row.extend([1, 2])
    # [9, 1, 2] matches (length 3): the continuation 3, 4, 5 (twice) for up to 3 tokens
    assert drafter.propose(row, 8) == ([3, 4, 5], pytest.approx(3.0))
    row2 = _Row([40], 1, depth=24)
    row2.extend([2])
    # only [1, 2] matches (length 2): 3 (2 of 3) then 4; 2 tokens at factor 1
    tokens, expected = drafter.propose(row2, 8)
    assert tokens == [3, 4] and expected == pytest.approx(2 / 3 + 2 / 3)
    assert SuffixDrafter(store, factor=0.5).propose(row2, 8)[0] == [3]  # factor x match length
    assert SuffixDrafter(store, min_prob=0.7).propose(row2, 8)[0] == []  # 2/3 < 0.7
    assert drafter.propose(row, 2)[0] == [3, 4]  # the block size caps it
    nothing = _Row([40], 77, depth=24)
    assert drafter.propose(nothing, 8) == ([], 0.0)


def test_a_row_drafts_from_its_own_text_too():
    drafter = SuffixDrafter(SuffixStore(), block_size=4)
    row = _Row([5, 6, 7, 8, 9, 1, 5, 6], 7, depth=24)  # [5, 6, 7] occurred earlier, followed by 8, 9
    assert drafter.propose(row, 4)[0] == [8, 9, 1]


def test_the_store_forgets_its_oldest_captions():
    store = SuffixStore(depth=4, max_sequences=2)
    for tokens in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):
        store.add(tokens)
    assert list(store.sequences) == [[4, 5, 6], [7, 8, 9]] and 1 not in store.trie.root[1] and store.added == 3
    small = SuffixStore(depth=4, max_nodes=20)
    for i in range(10):
        small.add([10 * i + j for j in range(5)])
    assert small.trie.nodes <= 20 and len(small.sequences) < 10


def _inputs(target, seeds):
    videos = [decode_frames(encode_mp4(render(scene_for_seed(s)))) for s in seeds]
    return model_inputs(target.processor, [PROMPT] * len(seeds), videos)


def test_on_demo_captions_it_learns_from_finished_rows_and_stays_lossless():
    target = flash.load_target(TARGET, dtype=torch.float64)
    seeds = list(range(60, 68))
    plain = flash.generate(target, None, _inputs(target, seeds), max_new_tokens=64).sequences
    store = SuffixStore()
    cold = flash.generate(target, SuffixDrafter(store, block_size=8), _inputs(target, seeds[:4]), max_new_tokens=64)
    assert cold.sequences == plain[:4] and store.added == 4  # finished rows went to the store
    warm = flash.generate(target, SuffixDrafter(store, block_size=8), _inputs(target, seeds[4:]), max_new_tokens=64)
    assert warm.sequences == plain[4:]
    assert warm.stats.acceptance_length > cold.stats.acceptance_length
    # every accepted token was drafted by suffix decoding, and the rows say so
    assert sum(warm.stats.row_suffix.values()) == warm.stats.accepted > 0
    assert warm.stats.acceptance_length > 1.4  # measured 1.62 from 4 captions in the store
    sampled = flash.generate(
        target,
        SuffixDrafter(store, block_size=8),
        _inputs(target, seeds[:2]),
        max_new_tokens=64,
        temperature=0.7,
        generator=torch.Generator().manual_seed(0),
    )
    assert all(len(s) > 0 for s in sampled.sequences)


def test_a_row_with_nothing_to_match_decodes_plainly():
    target = flash.load_target(TARGET, dtype=torch.float64)
    inputs = _inputs(target, [70])
    plain = flash.generate(target, None, inputs, max_new_tokens=64)
    out = flash.generate(target, SuffixDrafter(SuffixStore(), block_size=8, min_prob=1.0), inputs, max_new_tokens=64)
    assert out.sequences == plain.sequences
    # min_prob 1.0 proposes only continuations that never varied: few, in one caption's own text
    assert out.stats.drafted <= out.stats.cycles and out.stats.acceptance_length < 1.5


@pytest.mark.slow  # the whole job measures it too (bench/suffix_job.py)
def test_flash_with_suffix_is_lossless_and_accepts_at_least_what_flash_does():
    target = flash.load_target(TARGET, dtype=torch.float64)
    drafter = flash.FlashDrafter.from_pretrained(TARGET.parent / "demo-drafter", target)
    warm, seeds = list(range(200, 232)), list(range(80, 88))
    store = warm_store(flash.generate(target, None, _inputs(target, warm), max_new_tokens=64).sequences)
    plain = flash.generate(target, None, _inputs(target, seeds), max_new_tokens=64)
    alone = flash.generate(target, drafter, _inputs(target, seeds), max_new_tokens=64)
    both = WithSuffix(drafter, SuffixDrafter(store))
    out = flash.generate(target, both, _inputs(target, seeds), max_new_tokens=64)
    assert out.sequences == alone.sequences == plain.sequences
    assert out.stats.acceptance_length >= alone.stats.acceptance_length
    assert sum(n for _, _, n in both.record) > 0  # both proposers were scored
    sampled = flash.generate(
        target, both, _inputs(target, seeds[:2]), max_new_tokens=64, temperature=0.7,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert all(len(s) > 0 for s in sampled.sequences)


def test_with_a_weak_drafter_suffix_proposals_take_over():
    """An untrained FLASH drafter is rarely right: suffix proposals win their buckets and are
    verified instead, so FLASH + suffix accepts more than the drafter alone."""
    target = flash.load_target(TARGET, dtype=torch.float64)
    weak = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=4))
    warm, seeds = list(range(300, 332)), list(range(90, 106))
    store = warm_store(flash.generate(target, None, _inputs(target, warm), max_new_tokens=64).sequences)
    alone = flash.generate(target, weak, _inputs(target, seeds), max_new_tokens=64)
    out = flash.generate(target, WithSuffix(weak, SuffixDrafter(store)), _inputs(target, seeds), max_new_tokens=64)
    assert out.sequences == alone.sequences
    assert out.stats.acceptance_length > alone.stats.acceptance_length
    assert sum(out.stats.row_suffix.values()) > 0
