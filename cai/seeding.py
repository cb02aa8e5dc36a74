"""Seeds derived from what is being done, not from when: the same inputs give the same seed in any
process, batch order or resumed run (Python's `hash` is salted per process, so it cannot serve)."""

from __future__ import annotations

import hashlib


def stable_seed(*parts) -> int:
    """A 63-bit seed from the `repr` of `parts` (e.g. the run's seed, a purpose and a step)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
