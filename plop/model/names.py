"""Module names: which block a module sits in (its type is its role, see :mod:`plop.model.roles`).
Torch-free, so the ranker, the placements and the CLI can use it without importing torch."""

from __future__ import annotations

import re

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The block index in ``...layers.N...``, ``h.N``, ``layer.N``, ``blocks.N``; else None."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None
