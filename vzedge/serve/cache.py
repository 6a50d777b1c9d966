"""The image cache: VisionZip is text-agnostic, so an image's tokens and the KV cache of [prompt prefix + image]
serve every later question about it. Key: hash of the decoded image + budget + model + prompt prefix; LRU under a
byte cap."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class CacheEntry:
    tokens: torch.Tensor  # [1, K, D_llm] image tokens
    prefix: Any  # vzedge.runtime.backends.llm.Prefix: KV of [BOS + prefix text + image tokens]; None for the
    # text stage's stage-1 entries (the image's tokens only; each question then gets its own entry with a prefix)
    nbytes: int


def kv_bytes(cache: Any) -> int:
    """Bytes held by a transformers Cache (keys and values of every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def entry_bytes(tokens: torch.Tensor, prefix: Any) -> int:
    return tokens.numel() * tokens.element_size() + kv_bytes(prefix.cache)


class ImageCache:
    """LRU of CacheEntry by key under `capacity_bytes` (0: off). Thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"image cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[tuple, CacheEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: tuple) -> CacheEntry | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: tuple, entry: CacheEntry) -> bool:
        """Store `entry` (evicting the least recently used); False when it alone is over the cap."""
        with self._lock:
            if entry.nbytes > self.capacity_bytes:
                return False
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._items[key] = entry
            self.bytes += entry.nbytes
            while self.bytes > self.capacity_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1
            return True

    def __len__(self) -> int:
        return len(self._items)


__all__ = ["CacheEntry", "ImageCache", "entry_bytes", "kv_bytes"]
