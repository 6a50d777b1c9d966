"""The vision backend interface every backend implements: pixels [B, 3, H, W] -> image tokens [B, K, D]."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from vzedge.manifest import MANIFEST_NAME
from vzedge.runtime.preprocess import Preprocess
from vzedge.select.adaptive import AdaptiveBudget


class Prepared(NamedTuple):
    """Preprocessed input of one question: pixels [B, 3, H, W] (anyres: [N, crops, 3, H, W] and image_sizes)."""

    pixels: torch.Tensor
    image_sizes: torch.Tensor | None = None


class VisionBackend:
    """pixels -> tokens. `projected` says whether tokens are already in the LLM's width."""

    name = "vision"
    max_batch: int = 64  # the most frames one encode() call takes (an export's batch profile may be smaller)
    num_tokens: int
    projected: bool
    preprocess: Preprocess
    manifest: dict[str, Any] | None = None
    # Set when each image gets its own token count (vzedge.select.adaptive): `encode_each` gives it; `num_tokens`
    # is then the largest bucket, what prompt-size checks must allow for.
    adaptive: AdaptiveBudget | None = None

    def encode_each(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Images -> each one's tokens [K_i, D] (K_i varies with an adaptive budget), in chunks of `max_batch`."""
        px = pixel_values
        return [t for i in range(0, len(px), self.max_batch) for t in self.encode(px[i : i + self.max_batch])]

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, images: list[Any]) -> Prepared:
        """PIL images -> what `encode_prepared` takes (the manifest's preprocessing by default)."""
        return Prepared(self.preprocess.batch(images))

    def encode_prepared(self, prepared: Prepared) -> torch.Tensor:
        """All images of one question -> their tokens one after another, [1, T, D]. Each image is encoded on its
        own (in chunks of `max_batch`); with an adaptive budget each at its own bucket."""
        px = prepared.pixels
        if self.adaptive is not None:
            return torch.cat(self.encode_each(px)).unsqueeze(0)
        tokens = torch.cat([self.encode(px[i : i + self.max_batch]) for i in range(0, len(px), self.max_batch)])
        return tokens.reshape(1, -1, tokens.shape[-1])


def manifest_adaptive(manifest: dict[str, Any], folder: Any) -> tuple[AdaptiveBudget, dict[str, Any]] | None:
    """The budget and the `adaptive` block of an adaptive export's manifest (None for a fixed-budget export);
    ValueError naming the fix when the block is malformed."""
    block = manifest.get("adaptive")
    if block is None:
        return None
    where = f"{folder}/{MANIFEST_NAME}"
    try:
        budget = AdaptiveBudget(tuple(int(b) for b in block["buckets"]), float(block["mass"]))
        outs = block["outputs"]
        ok = [int(o["bucket"]) for o in outs] == list(budget.buckets) and all(
            isinstance(o["tokens"], str) for o in outs
        )
        ok = ok and isinstance(block["bucket_output"], str) and list(block["buckets"]) == list(budget.buckets)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: the adaptive block is malformed ({err!r}); re-export with --adaptive") from None
    if not ok:
        raise ValueError(f"{where}: the adaptive block's outputs do not list its buckets in order; re-export")
    return budget, block


def pick_buckets(outputs: dict[str, Any], block: dict[str, Any]) -> list[torch.Tensor]:
    """Each image's tokens from an adaptive graph's outputs (by name, numpy or torch): the tokens output of the
    bucket the graph chose for it, [K_i, D]."""
    bucket = torch.as_tensor(outputs[block["bucket_output"]]).long().flatten()
    names = [o["tokens"] for o in block["outputs"]]  # ascending, as `bucket` indexes them
    if len(bucket) and not 0 <= int(bucket.min()) <= int(bucket.max()) < len(names):
        raise ValueError(f"the graph chose bucket indices {bucket.tolist()} outside 0..{len(names) - 1}; re-export")
    tokens = {n: torch.as_tensor(outputs[n]) for n in set(names)}
    return [tokens[names[int(b)]][i] for i, b in enumerate(bucket.tolist())]


def check_adaptive_request(found: AdaptiveBudget | None, requested: AdaptiveBudget | None, folder: Any) -> None:
    """--adaptive with --vision must match the export's budget or be omitted; a fixed export refuses it."""
    if requested is None:
        return
    if found is None:
        raise ValueError(
            f"--adaptive {','.join(map(str, requested.buckets))}: {folder} is a fixed-budget export; re-export it with "
            "vzedge export --adaptive B1,B2,... (one graph with every bucket), or drop --adaptive"
        )
    if found.buckets != requested.buckets or abs(found.mass - requested.mass) > 1e-9:
        raise ValueError(
            f"--adaptive {','.join(map(str, requested.buckets))} --adaptive-mass {requested.mass:g} does not match "
            f"the export in {folder} (buckets {','.join(map(str, found.buckets))}, mass {found.mass:g}): omit "
            "--adaptive to use the export's, or re-export with the budget you want"
        )
