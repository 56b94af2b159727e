"""Which slot answers a request, and the automatic canary guard.

A canary weight W sends W% of requests to the canary. With an ``X-Request-Key`` header the
choice is a hash of the key, so the same key always lands in the same bucket (0-99) and gets
the same slot while W is unchanged -- and, since a bucket below W stays below a larger W,
raising W never moves a canary user back to stable. Without a key the choice is random.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from dataclasses import dataclass


def bucket_of(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100


def choose_slot(weight: int, has_canary: bool, key: str | None, rng: random.Random | None = None) -> str:
    if not has_canary or weight <= 0:
        return "stable"
    if weight >= 100:
        return "canary"
    bucket = bucket_of(key) if key else (rng or random).randrange(100)
    return "canary" if bucket < weight else "stable"


@dataclass(frozen=True)
class GuardPolicy:
    window: int = 200
    max_error_rate: float = 0.05
    min_agreement: float = 0.0  # 0: the agreement check is off


class CanaryGuard:
    """Sliding windows over the last N canary outcomes and shadow comparisons of one process.

    ``record_*`` return a rollback reason once a full window breaks the policy, at most once
    per canary version.
    """

    def __init__(self, policy: GuardPolicy) -> None:
        self.policy = policy
        self.version: str | None = None
        self.errors: deque[bool] = deque(maxlen=policy.window)
        self.agreements: deque[bool] = deque(maxlen=policy.window)
        self.tripped = False

    def _for(self, version: str) -> None:
        if version != self.version:
            self.version, self.tripped = version, False
            self.errors.clear()
            self.agreements.clear()

    def record_canary(self, version: str, error: bool) -> str | None:
        self._for(version)
        self.errors.append(error)
        full = len(self.errors) == self.policy.window
        if full and not self.tripped and sum(self.errors) / len(self.errors) > self.policy.max_error_rate:
            self.tripped = True
            return "guard_error_rate"
        return None

    def record_shadow(self, version: str, agree: bool) -> str | None:
        self._for(version)
        self.agreements.append(agree)
        full = len(self.agreements) == self.policy.window
        if (full and not self.tripped and self.policy.min_agreement > 0
                and sum(self.agreements) / len(self.agreements) < self.policy.min_agreement):
            self.tripped = True
            return "guard_agreement"
        return None
