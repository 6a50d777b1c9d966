"""The parity gate: the exported graph, run by ONNX Runtime, against the PyTorch VisionZipEncoder in fp32.

Figures, per input set:
- index_agreement: share of kept (dominant) positions that ORT and PyTorch both keep, over all images;
- max_abs_diff (dominant rows), contextual_max_abs_diff, and min/mean cosine of the output tokens, over rows
  paired by source (a dominant row with the reference row of the same position; the contextual rows of an
  image whose whole selection agrees), so one flipped selection shows in the agreement figure instead of
  swamping the others;
- rows_compared: the share of rows those figures cover.

fp16 and int8 graphs are compared with the fp32 model, since that is the answer they approximate; their
thresholds allow the rounding of the ViT layers and rare selection flips between near-tied scores.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParityThresholds:
    """Gate limits. The max-abs-diff limits are relative: MAX_ABS_DIFF_ATOL + rtol * max|reference|.

    Dominant rows are gathered tokens, the same arithmetic on both sides. Contextual rows get a looser limit:
    in flat image regions many keys are near-identical, so kernel rounding can move a member to another group
    (an ArgMax over near-ties), which shifts that group's average a little without being an error.
    """

    max_abs_diff_rtol: float
    contextual_max_abs_diff_rtol: float
    min_cosine: float
    min_index_agreement: float
    min_rows_compared: float
    # None: min_cosine holds for every compared row. A number: min_cosine holds for the dominant rows and this
    # one for the contextual rows (a member moved to another group between near-tied keys shifts its average).
    min_contextual_cosine: float | None = None


MAX_ABS_DIFF_ATOL = 1e-6
# fp32: the same computation up to kernel order; ORT matches PyTorch to ~1e-6 relative at ViT-L size.
FP32_THRESHOLDS = ParityThresholds(
    max_abs_diff_rtol=1e-4,
    contextual_max_abs_diff_rtol=1e-2,
    min_cosine=0.99999,
    min_index_agreement=0.99,
    min_rows_compared=0.95,
)
# fp16: 10-bit mantissas through the ViT layers; scoring, selection and merge are fp32 but see fp16 inputs.
FP16_THRESHOLDS = ParityThresholds(
    max_abs_diff_rtol=0.02,
    contextual_max_abs_diff_rtol=0.05,
    min_cosine=0.999,
    min_index_agreement=0.9,
    min_rows_compared=0.75,
)
# int8: ViT linear weights int8 per output channel, activations uint8 per tensor (see vzedge.export.quantize).
# Measured (random weights): dominant rows <= 1.0% relative, contextual <= 4.2%, cosine >= 0.9991, kept
# 0.944-0.988 (24-layer ViT-L/14-336 and tiny-random). The limits leave ~3x room on each; a checkpoint whose
# activation outliers int8 per-tensor scales cannot hold fails here instead of shipping.
INT8_THRESHOLDS = ParityThresholds(
    max_abs_diff_rtol=0.03,
    contextual_max_abs_diff_rtol=0.1,
    min_cosine=0.995,
    min_index_agreement=0.85,
    min_rows_compared=0.6,
)
# int8-static: the same layers, activations int8 with calibrated per-tensor scales (Q/DQ, for TensorRT). Issue 19's
# bar: kept-index agreement >= 0.95 and cosine >= 0.995 on the demo and random inputs; the cosine bar holds for the
# dominant rows (each a token of the image), contextual rows (averages over ~50 merged tokens) get 0.98. Measured
# (scales calibrated on 8-32 synthetic scenes): kept 0.963-1.0; dominant cosine >= 0.9989; contextual cosine down
# to 0.993 where one member changed group; dominant rows <= 1.5% relative on ViT-L and SigLIP-sized encoders, 6.9%
# on the trained tiny model's random-pixel input (outside the calibrated range, so clipped); contextual rows <= 3.3%,
# but 18.4% on tiny's demo image through its projector (one member moved group; that row's cosine 0.998).
INT8_STATIC_THRESHOLDS = ParityThresholds(
    max_abs_diff_rtol=0.1,
    contextual_max_abs_diff_rtol=0.25,
    min_cosine=0.995,
    min_index_agreement=0.95,
    min_rows_compared=0.6,
    min_contextual_cosine=0.98,
)
THRESHOLDS: dict[str, ParityThresholds] = {
    "fp32": FP32_THRESHOLDS,
    "fp16": FP16_THRESHOLDS,
    "int8": INT8_THRESHOLDS,
    "int8-static": INT8_STATIC_THRESHOLDS,
}


class ParityError(RuntimeError):
    """The exported graph does not match PyTorch within the thresholds; nothing was written."""


@dataclass
class ParityFigures:
    inputs: str
    batch: int
    max_abs_diff: float
    contextual_max_abs_diff: float
    max_abs_reference: float
    min_cosine: float
    mean_cosine: float
    index_agreement: float
    rows_compared: float
    dominant_min_cosine: float = -1.0
    contextual_min_cosine: float = 1.0  # 1.0 where no contextual row was compared

    def failures(self, th: ParityThresholds) -> list[str]:
        limit = MAX_ABS_DIFF_ATOL + th.max_abs_diff_rtol * self.max_abs_reference
        ctx_limit = MAX_ABS_DIFF_ATOL + th.contextual_max_abs_diff_rtol * self.max_abs_reference
        bad = []
        if not self.max_abs_diff <= limit:
            bad.append(f"max_abs_diff {self.max_abs_diff:.3g} > {limit:.3g}")
        if not self.contextual_max_abs_diff <= ctx_limit:
            bad.append(f"contextual max_abs_diff {self.contextual_max_abs_diff:.3g} > {ctx_limit:.3g}")
        if th.min_contextual_cosine is None:
            if not self.min_cosine >= th.min_cosine:
                bad.append(f"min cosine {self.min_cosine:.6f} < {th.min_cosine}")
        else:
            if not self.dominant_min_cosine >= th.min_cosine:
                bad.append(f"dominant min cosine {self.dominant_min_cosine:.6f} < {th.min_cosine}")
            if not self.contextual_min_cosine >= th.min_contextual_cosine:
                bad.append(f"contextual min cosine {self.contextual_min_cosine:.6f} < {th.min_contextual_cosine}")
        if not self.index_agreement >= th.min_index_agreement:
            bad.append(f"index agreement {self.index_agreement:.4f} < {th.min_index_agreement}")
        if not self.rows_compared >= th.min_rows_compared:
            bad.append(f"rows compared {self.rows_compared:.3f} < {th.min_rows_compared}")
        return [f"{self.inputs}: {b}" for b in bad]


def compare(
    name: str, tokens: np.ndarray, kept: np.ndarray, ref_tokens: torch.Tensor, ref_kept: torch.Tensor
) -> ParityFigures:
    """Figures for one input set: ORT outputs (numpy) against the PyTorch reference."""
    t = torch.from_numpy(np.asarray(tokens)).float()
    k = torch.from_numpy(np.asarray(kept)).long()
    rt, rk = ref_tokens.float(), ref_kept.long()
    if t.shape != rt.shape or k.shape != rk.shape:
        raise ParityError(f"{name}: output shapes {list(t.shape)}/{list(k.shape)} != {list(rt.shape)}/{list(rk.shape)}")
    b, n_kept = rk.shape
    # A selector with no kept input tokens (pool) has nothing to agree on: all its rows pair by slot below.
    agree = sum(len(set(k[i].tolist()) & set(rk[i].tolist())) for i in range(b)) / (b * n_kept) if n_kept else 1.0
    # Pair rows by source: a dominant row with the reference row of the same position; contextual rows only
    # where the image's whole selection agrees (they are merged from everything not kept).
    ours, theirs, ctx_ours, ctx_theirs = [], [], [], []
    for i in range(b):
        ref_slot = {p: j for j, p in enumerate(rk[i].tolist())}
        for j, p in enumerate(k[i].tolist()):
            if p in ref_slot:
                ours.append(t[i, j])
                theirs.append(rt[i, ref_slot[p]])
        if bool((k[i] == rk[i]).all()):
            ctx_ours.extend(t[i, n_kept:])
            ctx_theirs.extend(rt[i, n_kept:])
    paired = len(ours) + len(ctx_ours)
    if paired:
        a, r = torch.stack(ours + ctx_ours), torch.stack(theirs + ctx_theirs)
        cos = torch.nn.functional.cosine_similarity(a, r, dim=-1)
        min_cos, mean_cos = float(cos.min()), float(cos.mean())
    else:
        min_cos, mean_cos = -1.0, -1.0
    cosine = torch.nn.functional.cosine_similarity
    ctx_cos = float(cosine(torch.stack(ctx_ours), torch.stack(ctx_theirs), dim=-1).min()) if ctx_ours else 1.0
    if ours:
        dom_cos = float(cosine(torch.stack(ours), torch.stack(theirs), dim=-1).min())
    else:  # pool: no kept token, every row held to the dominant bar
        dom_cos = ctx_cos if n_kept == 0 and ctx_ours else -1.0
    ctx_diff = float((torch.stack(ctx_ours) - torch.stack(ctx_theirs)).abs().max()) if ctx_ours else 0.0
    if ours:
        diff = float((torch.stack(ours) - torch.stack(theirs)).abs().max())
    else:  # pool keeps no input token: every row is compared by slot, under the strict (dominant) limit too
        diff = ctx_diff if n_kept == 0 and ctx_ours else float("inf")
    return ParityFigures(
        inputs=name,
        batch=b,
        max_abs_diff=diff,
        contextual_max_abs_diff=ctx_diff,
        max_abs_reference=float(rt.abs().max()),
        min_cosine=min_cos,
        mean_cosine=mean_cos,
        index_agreement=float(agree),
        rows_compared=paired / (rt.shape[0] * rt.shape[1]),
        dominant_min_cosine=dom_cos,
        contextual_min_cosine=ctx_cos,
    )


@torch.no_grad()
def run_gate(session: Any, reference: torch.nn.Module, inputs: dict[str, torch.Tensor], dtype: str) -> dict[str, Any]:
    """Run ORT `session` and `reference` (fp32 VisionGraph) on each named input batch; raise ParityError on
    a failed threshold. Returns the report for the manifest."""
    th = THRESHOLDS[dtype]
    in_name = session.get_inputs()[0].name
    figures, failures = [], []
    for name, pixels in inputs.items():
        ref_tokens, ref_kept = reference(pixels.float())
        tokens, kept = session.run(None, {in_name: pixels.float().numpy()})
        fig = compare(name, tokens, kept, ref_tokens, ref_kept)
        log.info(
            "parity %s (batch %d): max|diff| %.3g, contextual %.3g (max|ref| %.3g), cosine min %.6f, kept %.4f",
            name,
            fig.batch,
            fig.max_abs_diff,
            fig.contextual_max_abs_diff,
            fig.max_abs_reference,
            fig.min_cosine,
            fig.index_agreement,
        )
        figures.append(fig)
        failures += fig.failures(th)
    report = {
        "dtype": dtype,
        "reference": "torch VisionZipEncoder, float32",
        "thresholds": {**asdict(th), "max_abs_diff_atol": MAX_ABS_DIFF_ATOL},
        "results": [asdict(f) for f in figures],
        "passed": not failures,
    }
    if failures:
        raise ParityError("parity gate failed: " + "; ".join(failures))
    return report


@torch.no_grad()
def run_adaptive_gate(
    session: Any,
    references: dict[int, torch.nn.Module],
    encoder: Any,
    budget: Any,
    outputs: dict[int, tuple[str, str]],
    names: tuple[str, str],
    inputs: dict[str, torch.Tensor],
    dtype: str,
) -> dict[str, Any]:
    """The gate of an adaptive graph: every bucket's outputs against `references[k]` (an fp32 VisionGraph of
    `VisionZipEncoder` at that bucket), with the thresholds of `dtype`, on every image (the graph selects at every
    bucket for every image); and the in-graph bucket index against `encoder.forward_adaptive` (fp32), whose
    agreement (share of images) must reach the same `min_index_agreement`. `outputs[k]`: (tokens, kept) output
    names of bucket k; `names`: the (bucket, needed) output names. Raises ParityError; returns the report."""
    th = THRESHOLDS[dtype]
    in_name = session.get_inputs()[0].name
    figures, failures, buckets = [], [], []
    for name, pixels in inputs.items():
        px = pixels.float()
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {in_name: px.numpy()}), strict=True))
        for k, ref in references.items():
            ref_tokens, ref_kept = ref(px)
            tok_name, kept_name = outputs[k]
            fig = compare(f"{name}@{k}", got[tok_name], got[kept_name], ref_tokens, ref_kept)
            log.info(
                "parity %s (batch %d): max|diff| %.3g, contextual %.3g, cosine min %.6f, kept %.4f",
                fig.inputs,
                fig.batch,
                fig.max_abs_diff,
                fig.contextual_max_abs_diff,
                fig.min_cosine,
                fig.index_agreement,
            )
            figures.append(fig)
            failures += fig.failures(th)
        ref_ad = encoder.forward_adaptive(px, budget)
        ours = torch.from_numpy(np.asarray(got[names[0]])).long()
        needed = torch.from_numpy(np.asarray(got[names[1]])).long()
        agree = float((ours == ref_ad.bucket).float().mean())
        record = {
            "inputs": name,
            "batch": int(px.shape[0]),
            "bucket": ours.tolist(),
            "reference_bucket": ref_ad.bucket.tolist(),
            "needed": needed.tolist(),
            "reference_needed": ref_ad.needed.tolist(),
            "agreement": agree,
        }
        log.info("parity %s: buckets %s (reference %s)", name, record["bucket"], record["reference_bucket"])
        buckets.append(record)
        if not agree >= th.min_index_agreement:
            failures.append(
                f"{name}: bucket index agreement {agree:.4f} < {th.min_index_agreement} "
                f"(graph {record['bucket']}, forward_adaptive {record['reference_bucket']})"
            )
    report = {
        "dtype": dtype,
        "reference": "torch VisionZipEncoder at each bucket, float32; buckets: VisionZipEncoder.forward_adaptive",
        "thresholds": {
            **asdict(th),
            "max_abs_diff_atol": MAX_ABS_DIFF_ATOL,
            "min_bucket_agreement": th.min_index_agreement,
        },
        "results": [asdict(f) for f in figures],
        "buckets": buckets,
        "passed": not failures,
    }
    if failures:
        raise ParityError("parity gate failed: " + "; ".join(failures))
    return report
