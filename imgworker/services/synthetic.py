"""The synthetic algorithm service's shape, apart from the service so that the CLI can read it without aiohttp."""

from __future__ import annotations

import msgspec


class SyntheticParams(msgspec.Struct, frozen=True, kw_only=True):
    """Shape of the synthetic service: latency distribution and fault rates (0..1)."""

    latency_ms: float = 197.0
    sigma: float = 0.5
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    malformed_rate: float = 0.0
    false_rate: float = 0.0
    detection_rate: float = 0.3
    hang_s: float = 3600.0
    seed: int = 0
    trickle_s: float = 0.0
    """> 0: for an image_path containing "trickle", send 200 and headers, then a byte every trickle_s for hang_s."""
    count_override: float = -1.0
    """>= 0: for an image_path containing "huge", answer result {"count": count_override}."""
    slots: int = 0
    """> 0: serve at most this many calls at once (synthetic backend); the others queue."""
