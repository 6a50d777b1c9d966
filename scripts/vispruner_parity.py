"""How often the vispruner selection differs between PyTorch and ONNX Runtime, per variant; JSON on stdout.

    python scripts/vispruner_parity.py --model tiny --dominant 24 --contextual 4 --synth 40
    python scripts/vispruner_parity.py --model DIR --dominant 54 --contextual 10   # e.g. a 3-layer random ViT-L

For each image (demo scenes, synth-small scenes, random pixels) the selection-layer output and attention scores
come from PyTorch and from an exported ORT graph of the same layers; each variant's selection is exported too,
and "differs" counts images where ORT's selection on ORT's inputs keeps another set than PyTorch's on PyTorch's
(the parity gate's situation). `noise` counts selections changed by 1e-6 relative noise on PyTorch's inputs.
Variants: `released` (VisPruner's released rounds), `raster split` (A/B over sequence order, float32 dot
products), `raster + dot grid` (that, with the dot products on a 2**-10 grid and position priority), and
`vzedge` (the library: plus distances recomputed from differences of the nearest candidates).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vzedge import VisionZipConfig, VisionZipEncoder, synth
from vzedge.api import preprocess
from vzedge.bench import conditions
from vzedge.images import demo_image
from vzedge.models.loading import load_model
from vzedge.select import vispruner as vp
from vzedge.select.base import gather_rows, sort_positions, unit_rows

Select = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def released(scores: torch.Tensor, feats: torch.Tensor, important: int, diverse: int) -> torch.Tensor:
    """VisPruner's released rounds (vzedge's vispruner before issue 18)."""
    order = torch.sort(scores.float(), dim=1, descending=True).indices
    keep, residual = order[:, :important], order[:, important:]
    f = unit_rows(feats)
    for r in vp.dedup_rounds(feats.shape[1] - important, diverse):
        t = gather_rows(f, residual)
        a, b = residual[:, ::2], residual[:, 1::2]
        sim = torch.matmul(t[:, ::2], t[:, 1::2].transpose(1, 2)).max(dim=-1).values
        distinct = torch.sort(sim, dim=1, descending=True).indices[:, r:]
        residual = torch.cat([torch.gather(a, 1, distinct), b], dim=1)
    return torch.cat([keep, residual], dim=1)


def raster(grid: bool) -> Select:
    """A/B over the residual in sequence order; float32 dot products, raw or on the 2**-10 grid + priority."""

    def select(scores: torch.Tensor, feats: torch.Tensor, important: int, diverse: int) -> torch.Tensor:
        n = feats.shape[1]
        order = torch.sort(scores.float(), dim=1, descending=True).indices
        keep, residual = order[:, :important], sort_positions(order[:, important:])
        prio, f = vp.tie_priority(n), unit_rows(feats)
        for r in vp.dedup_rounds(n - important, diverse):
            t = gather_rows(f, residual)
            a, b = residual[:, ::2], residual[:, 1::2]
            dist = 1 - torch.matmul(t[:, ::2], t[:, 1::2].transpose(1, 2)).max(dim=-1).values
            key = vp.dist_keys(dist, prio[a], n) if grid else dist
            residual = sort_positions(torch.cat([torch.gather(a, 1, torch.sort(key, dim=1).indices[:, r:]), b], 1))
        return torch.cat([keep, residual], dim=1)

    return select


VARIANTS: dict[str, Select] = {
    "released": released,
    "raster split": raster(grid=False),
    "raster + dot grid": raster(grid=True),
    "vzedge": vp.vispruner_indices,
}


class _Inputs(nn.Module):
    def __init__(self, enc: VisionZipEncoder) -> None:
        super().__init__()
        self.enc = enc

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.enc._layer_inputs(pixels)
        scores, _ = self.enc._score_and_keys(x)
        return self.enc.tower.layers[self.enc.layer_index](x, None)[:, 1:], scores[:, 1:]


class _Select(nn.Module):
    def __init__(self, fn: Select, important: int, diverse: int) -> None:
        super().__init__()
        self.fn, self.important, self.diverse = fn, important, diverse

    def forward(self, scores: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.fn(scores, feats, self.important, self.diverse)


def _session(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], path: Path) -> Any:
    import onnxruntime as ort

    batch = torch.export.Dim("batch", min=1, max=8)
    dims = tuple({0: batch} for _ in names)
    program = torch.onnx.export(module.eval(), example, dynamo=True, input_names=names, dynamic_shapes=dims)
    program.save(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _differs(a: torch.Tensor, b: torch.Tensor) -> int:
    return sum(set(x.tolist()) != set(y.tolist()) for x, y in zip(a, b, strict=True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dominant", type=int, default=24)
    ap.add_argument("--contextual", type=int, default=4)
    ap.add_argument("--synth", type=int, default=40, help="synth-small test scenes (plus 4 demo, 4 random)")
    ap.add_argument("--noise-draws", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    vz = VisionZipConfig(args.dominant, args.contextual, selector="vispruner")
    enc = VisionZipEncoder(loaded.vision.float(), vz).eval()
    size = enc.tower.image_size
    images = [demo_image(size=size, seed=s) for s in range(4)]
    images += [synth.render(x.scene, size) for x in synth.samples("test", args.synth, variant="small")]
    pixels = torch.cat([preprocess(loaded, images).float(), torch.randn(4, 3, size, size)])
    chunks = list(torch.split(pixels, 4))
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        inputs = _Inputs(enc)
        sess = _session(inputs, (chunks[0],), ["pixels"], Path(tmp) / "inputs.onnx")
        ours = [inputs(c) for c in chunks]
        theirs = [[torch.from_numpy(a) for a in sess.run(None, {"pixels": c.numpy()})] for c in chunks]
        rows = []
        for name, fn in VARIANTS.items():
            sel = _Select(fn, args.dominant, args.contextual)
            s_sess = _session(sel, (ours[0][1], ours[0][0]), ["scores", "feats"], Path(tmp) / "select.onnx")
            ref = torch.cat([fn(s, h, args.dominant, args.contextual) for h, s in ours])
            ort_kept = torch.cat(
                [torch.from_numpy(s_sess.run(None, {"scores": s.numpy(), "feats": h.numpy()})[0]) for h, s in theirs]
            )
            g = torch.Generator().manual_seed(1)
            noisy = 0
            for _ in range(args.noise_draws):
                for (h, s), k in zip(ours, torch.split(ref, 4), strict=True):
                    hn = h * (1 + 1e-6 * torch.randn(h.shape, generator=g))
                    sn = s * (1 + 1e-6 * torch.randn(s.shape, generator=g))
                    noisy += _differs(fn(sn, hn, args.dominant, args.contextual), k)
            rows.append(
                {
                    "variant": name,
                    "images": len(pixels),
                    "ort_differs": _differs(ref, ort_kept),
                    "noise_1e-6_differs": noisy,
                    "noise_selections": args.noise_draws * len(pixels),
                }
            )
            print(f"{name}: {rows[-1]}", file=sys.stderr)
    print(json.dumps({"model": args.model, "visionzip": vz.to_dict(), "rows": rows, "conditions": conditions()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
