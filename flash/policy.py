"""Adaptive block length: per cycle, the k (0 = plain decoding) that maximises
expected tokens per second for the current batch size.

    expected tokens(k) = 1 + sum_{i=1..k} prod_{j<=i} alpha_j
    seconds(k)         = draft(k) + verify(k + 1)          (0 draft seconds when k = 0)

alpha_j, the chance that drafted token j is accepted once tokens 1..j-1 were,
is estimated from every cycle's outcome; draft and verify seconds are measured
per (batch-size bucket, k). Lengths never measured are estimated from the
nearest measured one (a straight line through two, else flat), which is
optimistic, so the policy tries them and learns their real cost. Every
`explore_every` cycles it tries a neighbour of the best k to keep estimates
current. Any k is lossless; the policy only moves speed.

One policy object can be shared across generate calls (an actor keeps one), so
what it learns carries over from batch to batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def expected_tokens(alphas: list[float], k: int) -> float:
    total, survive = 1.0, 1.0
    for j in range(k):
        survive *= alphas[j]
        total += survive
    return total


def _bucket(batch: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(batch, 1))))


@dataclass
class BlockPolicy:
    max_block: int = 4
    decay: float = 0.95  # weight of the past in running estimates
    explore_every: int = 16
    prior_alpha: float = 0.7
    alpha_hits: list[float] = field(default_factory=list)
    alpha_tries: list[float] = field(default_factory=list)
    seconds: dict[tuple[int, str, int], float] = field(default_factory=dict)  # (bucket, draft|verify, k) -> s
    cycles: int = 0

    def __post_init__(self) -> None:
        if not self.alpha_hits:
            self.alpha_hits = [self.prior_alpha * 4] * self.max_block
            self.alpha_tries = [4.0] * self.max_block

    @property
    def alphas(self) -> list[float]:
        return [h / t if t > 0 else self.prior_alpha for h, t in zip(self.alpha_hits, self.alpha_tries)]

    def _cost(self, bucket: int, kind: str, k: int) -> float | None:
        known = sorted((kk, s) for (b, kd, kk), s in self.seconds.items() if b == bucket and kd == kind)
        if not known:
            return None
        exact = dict(known)
        if k in exact:
            return exact[k]
        if len(known) == 1:
            return known[0][1]
        (k0, s0), (k1, s1) = known[0], known[-1]
        return max(1e-9, s0 + (s1 - s0) * (k - k0) / (k1 - k0))

    def seconds_per_cycle(self, batch: int, k: int) -> float | None:
        bucket = _bucket(batch)
        verify = self._cost(bucket, "verify", k)
        if verify is None:
            return None
        if k == 0:
            return verify
        draft = self._cost(bucket, "draft", k)
        return verify + (draft if draft is not None else 0.0)

    def choose(self, batch: int) -> int:
        """The block length for the next cycle."""
        self.cycles += 1
        rates = []
        for k in range(self.max_block + 1):
            seconds = self.seconds_per_cycle(batch, k)
            if seconds is None:  # nothing measured for this batch size yet: start with full blocks
                return self.max_block
            rates.append(expected_tokens(self.alphas, k) / seconds)
        best = max(range(len(rates)), key=lambda k: rates[k])
        if self.explore_every and self.cycles % self.explore_every == 0:
            step = 1 if (self.cycles // self.explore_every) % 2 else -1
            best = min(self.max_block, max(0, best + step))
        return best

    def observe(self, batch: int, k: int, draft_s: float, verify_s: float, accepted: list[int]) -> None:
        """Record one cycle: its block length, measured seconds and each row's accepted count."""
        bucket = _bucket(batch)
        for kind, s in (("verify", verify_s), ("draft", draft_s)):
            if kind == "draft" and k == 0:
                continue
            key = (bucket, kind, k)
            old = self.seconds.get(key)
            self.seconds[key] = s if old is None else self.decay * old + (1 - self.decay) * s
        if k == 0:
            return
        self.alpha_hits = [h * self.decay for h in self.alpha_hits]
        self.alpha_tries = [t * self.decay for t in self.alpha_tries]
        for n in accepted:
            for j in range(min(n + 1, k)):  # tokens 1..n accepted, token n+1 (if drafted) rejected
                self.alpha_tries[j] += 1
                if j < n:
                    self.alpha_hits[j] += 1
