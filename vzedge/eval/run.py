"""Accuracy against the visual-token budget: VisionZip and the baselines a reader needs to judge it.

For each budget K the same LLaVA model answers the same questions (greedy decoding, exact match after
normalisation) on K visual tokens per image, chosen by a selector of `vzedge.select` through
`apply_visionzip` (the library path):

- `visionzip`: dominant:contextual split in the paper's 54:10 ratio;
- `divprune`: K patches by max-min feature diversity;
- `vispruner`: the 54:10 split as important (attention) : diverse (de-duplicated) patches;
- `random`: CLS plus K-1 patches drawn uniformly (seeded), in sequence order;
- `pool`: K averages of near-square patch regions (rows split into bands, each band pooled along the
  columns to its share of K), CLS not used;
- `cdpruner` (text-conditioned, `vzedge.select.textcond`): the model's projected features of all patches
  (the image-only stage 1 a runtime caches), then K of them per question by conditional DPP, relevance =
  cosine to the LLM's input embeddings of the question tokens; answered through `inputs_embeds`.

Every row has its 95% Wilson interval (`ci_low`, `ci_high`) over its questions. With `adaptive` buckets,
each method also gets a `METHOD+adaptive` row (every image at the bucket its attention mass asks for; the
bucket depends on the image only, so every method sees the same per-image counts) and a fixed row at the
same mean token count.

All take the output of the model's feature layer (-2) and go through the model's own projector;
`full` is the stock model on all its patches. Budgets are given in LLaVA-1.5 tokens (576 patches) and
scaled to the model's grid unless `scale=False`.

With `tuned` folders (`vzedge tune` outputs), each adds a `visionzip+tuned` row at the token count it was
tuned for: VisionZip with the folder's config and its tuned projector weights (through
`apply_visionzip(projector=...)`), the original weights put back bit for bit afterwards.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from vzedge import synth
from vzedge.bench import conditions
from vzedge.encoder import VisionZipEncoder
from vzedge.eval.config import (
    ADAPTIVE_SUFFIX,
    LLAVA15_PATCHES,
    STAGE2_METHODS,
    TEXT_METHODS,
    TUNED_METHOD,
    EvalConfig,
    TunedRow,
)
from vzedge.eval.data import Item, baselines, correct, llava_items, mcnemar_exact, score, synth_items, wilson_interval
from vzedge.eval.reduce import adapt_tower, reduced_tokens, scaled_budget, stock_image_tokens, visionzip_split
from vzedge.eval.report import tuning_summary
from vzedge.models.loading import load_model
from vzedge.models.projector import read_tune_config, read_tuned_projector
from vzedge.models.textstage import generate_text_conditioned, image_cache_tokens, select_for_questions
from vzedge.select import AdaptiveBudget
from vzedge.select.textcond import TextStage
from vzedge.visionzip import VisionZipConfig

log = logging.getLogger(__name__)


@torch.no_grad()
def answer(
    vlm: nn.Module, processor: Any, items: list[Item], k: int, batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy answers with k image placeholders per prompt (the model must be set to produce k tokens)."""
    tok = processor.tokenizer
    image_token = getattr(processor, "image_token", "<image>")
    side = tok.padding_side
    tok.padding_side = "left"
    eos = vlm.generation_config.eos_token_id if vlm.generation_config.eos_token_id is not None else tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    out: list[str] = []
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            texts = [it.prompt.replace("<image>", image_token * k) for it in batch]
            enc = tok(texts, return_tensors="pt", padding=True)
            pixels = processor.image_processor(images=[it.image for it in batch], return_tensors="pt")["pixel_values"]
            gen = vlm.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                pixel_values=pixels.to(vlm.dtype),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out += tok.batch_decode(new, skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


@torch.no_grad()
def answer_text_conditioned(
    vlm: nn.Module,
    processor: Any,
    items: list[Item],
    k: int,
    batch_size: int,
    max_new_tokens: int,
    conditioned: bool = True,
) -> list[str]:
    """Greedy answers on k tokens per question chosen by the text-conditioned stage from all projected patch
    tokens (stage 1), conditioned on each item's question (conditioned=False: the `dpp` ablation, relevance 1)."""
    stage = TextStage(k, conditioned=conditioned)
    image_token = getattr(processor, "image_token", "<image>")
    out: list[str] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        pixels = processor.image_processor(images=[it.image for it in batch], return_tensors="pt")["pixel_values"]
        cached = image_cache_tokens(vlm, pixels)
        questions = [it.question or it.prompt.replace("<image>", "") for it in batch]
        tokens, _ = select_for_questions(vlm, processor.tokenizer, cached, questions, stage)
        prompts = [it.prompt.replace("<image>", image_token) for it in batch]
        out += generate_text_conditioned(vlm, processor.tokenizer, prompts, tokens, max_new_tokens, image_token)
    return out


def answer_with(vlm: nn.Module, processor: Any, items: list[Item], method: str, k: int, cfg: EvalConfig) -> list[str]:
    """Answers with k tokens per image chosen by `method` (a selector or a text-conditioned stage)."""
    if method in STAGE2_METHODS:
        conditioned = method in TEXT_METHODS
        return answer_text_conditioned(vlm, processor, items, k, cfg.batch_size, cfg.max_new_tokens, conditioned)
    with reduced_tokens(vlm, method, k, cfg.seed):
        return answer(vlm, processor, items, k, cfg.batch_size, cfg.max_new_tokens)


def evaluate_full_tokens(vlm: nn.Module, processor: Any, samples: list[Any], batch_size: int = 32) -> dict[str, float]:
    """Accuracy at full tokens on synth samples (what the training script records)."""

    size = vlm.config.vision_config.image_size
    items = [
        Item(s.id, s.kind, f"USER: <image>\n{s.question} ASSISTANT:", s.answer, synth.render(s.scene, size))
        for s in samples
    ]
    preds = answer(vlm, processor, items, stock_image_tokens(vlm), batch_size, 10)
    return {k: round(v, 4) for k, v in score(items, preds).items()}


@torch.no_grad()
def attention_on_objects(
    vlm: nn.Module, processor: Any, n: int, seed: int, k: int, variant: str = "standard"
) -> dict[str, float]:
    """Is CLS attention informative? On n synth test scenes: the share of the CLS row's attention (layer
    -2, patches only) that falls on shape or text patches, the share of VisionZip's dominant patches
    (at k tokens) that are such patches, and the share of the image those patches cover."""

    inner = vlm.model
    vcfg = vlm.config.vision_config
    dominant, contextual = visionzip_split(k)
    layer = int(getattr(vlm.config, "vision_feature_layer", -2))
    enc = VisionZipEncoder(inner.vision_tower, VisionZipConfig(dominant=dominant, contextual=contextual, layer=layer))
    scenes = [s.scene for s in synth.samples("test", n, seed=seed, variant=variant)]
    images = [synth.render(sc, vcfg.image_size) for sc in scenes]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    ex = enc.explain(pixels.to(vlm.dtype))
    fg = torch.stack(
        [torch.from_numpy(synth.patch_labels(sc, vcfg.image_size, vcfg.patch_size)["shape"] > 0) for sc in scenes]
    )
    patch_scores = ex.scores[:, 1:]
    attn = (patch_scores * fg).sum(1) / patch_scores.sum(1)
    kept = ex.kept_indices[:, 1:] - 1  # dominant patches (CLS dropped), as patch indices
    kept_fg = torch.gather(fg, 1, kept).float().mean(1)
    return {
        "cls_attention_on_objects": round(float(attn.mean()), 4),
        "dominant_patches_on_objects": round(float(kept_fg.mean()), 4),
        "object_area": round(float(fg.float().mean()), 4),
        "tokens": k,
        "scenes": n,
    }


def evaluated_counts(cfg: EvalConfig, num_patches: int) -> dict[int, int]:
    """Reduced token counts eval runs on a grid of `num_patches`, each with the (largest) budget giving it."""
    counts: dict[int, int] = {}
    for budget in sorted(set(cfg.tokens), reverse=True):
        k = scaled_budget(budget, num_patches, cfg.scale)
        if k < num_patches:
            counts.setdefault(k, budget)
    return counts


def plan_tuned(cfg: EvalConfig, vlm: nn.Module, num_patches: int) -> list[TunedRow]:
    """Check every `cfg.tuned` folder against `vlm` (base model, weights) and the evaluated budgets, before
    any row runs; nothing is modified. ValueError names the fix."""

    counts = evaluated_counts(cfg, num_patches)
    plan = []
    for folder in cfg.tuned:
        tuned_vz = read_tune_config(folder)["visionzip"]
        try:
            vz = VisionZipConfig(**tuned_vz)
        except (TypeError, ValueError) as err:
            msg = f"--tuned {folder!r}: VisionZip config {tuned_vz} is not valid ({err}); tune again"
            raise ValueError(msg) from err
        record = read_tuned_projector(folder, vlm, vz).record  # another base model or edited weights: refused
        k = vz.num_tokens
        if k not in counts:
            raise ValueError(_budget_hint(folder, vz, counts, num_patches, cfg))
        if (vz.dominant, vz.contextual) != visionzip_split(k):
            log.info(
                "%s was tuned for %d+%d; its row uses that split (the visionzip rows use %d+%d)",
                folder,
                vz.dominant,
                vz.contextual,
                *visionzip_split(k),
            )
        plan.append(TunedRow(folder, counts[k], vz, record))
    return plan


def _budget_hint(folder: str, vz: VisionZipConfig, counts: dict[int, int], num_patches: int, cfg: EvalConfig) -> str:
    k = vz.num_tokens
    tokens = ",".join(str(t) for t in cfg.tokens)
    how = "scaled from LLaVA-1.5's 576 patches" if cfg.scale else "taken literally (--no-scale)"
    head = (
        f"--tuned {folder!r} was tuned for {k} VisionZip tokens ({vz.dominant}+{vz.contextual}) but eval runs "
        f"VisionZip at {sorted(counts, reverse=True) or 'no reduced count'} tokens on this model's {num_patches} "
        f"patches (--tokens {tokens}, {how})"
    )
    if k >= num_patches:
        return f"{head}; a tuned row needs fewer tokens than the {num_patches} patches: tune for a smaller budget"
    literal = ",".join(str(c) for c in sorted({*counts, k}, reverse=True))
    fixes = [f"--no-scale --tokens {num_patches},{literal}"] if cfg.scale else [f"--no-scale --tokens {tokens},{k}"]
    if cfg.scale:
        exact = [t for t in range(1, LLAVA15_PATCHES + 1) if scaled_budget(t, num_patches, True) == k]
        if exact:
            t = min(exact, key=lambda t: abs(t - k * LLAVA15_PATCHES / num_patches))
            which = f"budget {t} scales" if len(exact) == 1 else f"budgets {exact[0]}-{exact[-1]} scale"
            fixes.insert(0, f"--tokens {tokens},{t} (LLaVA-1.5 {which} to {k})")
    return f"{head}; add its budget: {' or '.join(fixes)}"


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Accuracy per kind and overall at each budget for each method (and each tuned folder); JSON-ready."""

    loaded = load_model(cfg.model)
    if loaded.vlm is None or loaded.processor is None:
        raise ValueError(f"{cfg.model!r} is a bare vision encoder; eval needs a LLaVA model (e.g. --model tiny)")
    vlm, processor = loaded.vlm.eval(), loaded.processor
    vcfg = vlm.config.vision_config
    grid = vcfg.image_size // vcfg.patch_size
    num_patches = grid * grid
    plan = plan_tuned(cfg, vlm, num_patches)  # before any row runs: a bad folder fails fast
    variant = cfg.synth_variant
    if variant is not None:
        items = synth_items(cfg.n, cfg.seed, vcfg.image_size, variant)
    else:
        items = llava_items(cfg.data, cfg.images or "", cfg.n)
    stock = stock_image_tokens(vlm)
    rows: list[dict[str, Any]] = []
    hits: list[list[bool]] = []  # per row, per question: right or wrong (for the paired comparison)
    t0 = time.perf_counter()

    def record(
        method: str,
        budget: int | None,
        k: float,
        split: tuple[int, int] | None,
        preds: list[str],
        t: float,
        weights: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        acc = score(items, preds)
        ok = correct(items, preds)
        hits.append(ok)
        lo, hi = wilson_interval(sum(ok), len(ok))
        per_kind = {}
        for kind in sorted({it.kind for it in items}):
            kind_ok = [c for c, it in zip(ok, items, strict=True) if it.kind == kind]
            per_kind[kind] = [round(v, 4) for v in wilson_interval(sum(kind_ok), len(kind_ok))]
        rows.append(
            {
                "method": method,
                "budget": budget,
                "tokens": k,
                "dominant": split[0] if split else None,
                "contextual": split[1] if split else None,
                "accuracy": {key: round(v, 4) for key, v in acc.items()},
                "correct": sum(ok),
                "ci_low": round(lo, 4),
                "ci_high": round(hi, 4),
                "ci_per_kind": per_kind,
                "projector_weights": weights,
                "text_conditioned": method.split("+")[0] in TEXT_METHODS,
                "seconds": round(time.perf_counter() - t, 2),
                **(extra or {}),
            }
        )
        log.info(
            "%-18s budget %4s -> %5.1f tokens: overall %.3f [%.3f, %.3f] (%.1f s)",
            method,
            budget,
            k,
            acc["overall"],
            lo,
            hi,
            rows[-1]["seconds"],
        )

    def run(
        method: str, budget: int, k: int, split: tuple[int, int] | None, weights: dict[str, Any] | None = None
    ) -> None:
        t = time.perf_counter()
        preds = answer(vlm, processor, items, k, cfg.batch_size, cfg.max_new_tokens)
        record(method, budget, k, split, preds, t, weights)

    budgets = sorted(set(cfg.tokens), reverse=True)
    run("full", max(budgets[0], LLAVA15_PATCHES if cfg.scale else num_patches), stock, None)
    for budget in budgets:
        k = scaled_budget(budget, num_patches, cfg.scale)
        if k >= num_patches:
            continue  # the full row already covers it
        for method in cfg.methods:
            split = visionzip_split(k) if method in ("visionzip", "vispruner") else None
            t = time.perf_counter()
            record(method, budget, k, split, answer_with(vlm, processor, items, method, k, cfg), t)
        for tuned in (t for t in plan if t.budget == budget):
            with reduced_tokens(vlm, TUNED_METHOD, k, cfg.seed, visionzip=tuned.visionzip, projector=tuned.folder):
                run(TUNED_METHOD, budget, k, (tuned.visionzip.dominant, tuned.visionzip.contextual), tuned.record)
    adaptive = None
    if cfg.adaptive:
        adaptive = run_adaptive(cfg, vlm, processor, items, num_patches, rows, record)
    paired_with_random(rows, hits)
    paired_second_stage(rows, hits)
    full = rows[0]["accuracy"]["overall"]
    for r in rows:
        r["relative_to_full"] = round(r["accuracy"]["overall"] / full, 4) if full > 0 else None
    smallest = min(r["tokens"] for r in rows)
    diag = None
    if variant is not None and getattr(adapt_tower(vlm), "has_cls", False) and smallest < num_patches:
        diag = attention_on_objects(vlm, processor, min(cfg.n, 100), cfg.seed, round(smallest), variant)
    return {
        "model": cfg.model,
        "source": loaded.source,
        "data": cfg.data,
        "questions": len(items),
        "kinds": {k: sum(it.kind == k for it in items) for k in sorted({it.kind for it in items})},
        "grid": grid,
        "stock_image_tokens": stock,
        "budgets_scaled_from_576": cfg.scale,
        "metric": "exact match after normalize() (lower case, no punctuation or articles), greedy decoding",
        "projector_tuning": tuning_summary(plan),
        "baselines": baselines(items, cfg.data, variant),
        "adaptive": adaptive,
        "interval": "95% Wilson score interval over the row's questions (ci_low, ci_high; ci_per_kind)",
        "paired": "vs_random: the same questions answered by random selection at the same token count (the "
        "adaptive rows: random+adaptive); a_only / b_only = questions only this row / only random got right, "
        "p_value = exact two-sided McNemar test",
        "attention": diag,
        "text_conditioned": _text_stage_record(cfg),
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
        "conditions": conditions(
            dtype=str(vlm.dtype).replace("torch.", ""),
            batch=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed,
            feature_layer=int(getattr(vlm.config, "vision_feature_layer", -2)),
        ),
    }


def _text_stage_record(cfg: EvalConfig) -> dict[str, Any] | None:
    """What the text-conditioned rows did (None when none ran): they saw the question, the others did not."""
    if not any(m in STAGE2_METHODS for m in cfg.methods):
        return None
    info = {k: v for k, v in TextStage(1).describe().items() if k != "tokens"}
    return {
        **info,
        "methods": {m: m in TEXT_METHODS for m in STAGE2_METHODS if m in cfg.methods},
        "stage1": "the model's projected features of all patch tokens (image only, cacheable)",
        "ablation": "dpp: the same stage with relevance 1 (the question unused)",
    }


@torch.no_grad()
def image_buckets(
    vlm: nn.Module, processor: Any, items: list[Item], budget: AdaptiveBudget, batch_size: int
) -> tuple[list[int], list[int]]:
    """Per item: the bucket index the attention-mass rule picks, and the tokens it asked for."""
    layer = int(getattr(vlm.config, "vision_feature_layer", -2))
    enc = VisionZipEncoder(vlm.model.vision_tower, VisionZipConfig(*visionzip_split(budget.buckets[0]), layer=layer))
    buckets: list[int] = []
    needed: list[int] = []
    for start in range(0, len(items), batch_size):
        images = [it.image for it in items[start : start + batch_size]]
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        b, n = enc.choose_buckets(pixels.to(vlm.dtype), budget)
        buckets += b.tolist()
        needed += n.tolist()
    return buckets, needed


def run_adaptive(
    cfg: EvalConfig, vlm: nn.Module, processor: Any, items: list[Item], num_patches: int, rows: list, record
) -> dict[str, Any]:
    """The adaptive rows: each method with every image at its own bucket, then each method at the fixed
    budget nearest the adaptive rows' mean token count (unless that row already ran)."""
    counts = sorted({scaled_budget(t, num_patches, cfg.scale) for t in cfg.adaptive})
    counts = [k for k in counts if k < num_patches]
    if len(counts) < 2:
        raise ValueError(
            f"--adaptive {','.join(map(str, cfg.adaptive))} gives {counts} distinct reduced token counts on this "
            f"model's {num_patches} patches; pass at least two budgets below the full count"
        )
    budget = AdaptiveBudget(tuple(counts), cfg.adaptive_mass)
    buckets, needed = image_buckets(vlm, processor, items, budget, cfg.batch_size)
    per_image = [counts[b] for b in buckets]
    mean_tokens = sum(per_image) / len(per_image)
    groups = {i: [j for j, b in enumerate(buckets) if b == i] for i in range(len(counts))}
    for method in cfg.methods:
        t = time.perf_counter()
        preds = [""] * len(items)
        for i, idx in groups.items():
            if not idx:
                continue
            got = answer_with(vlm, processor, [items[j] for j in idx], method, counts[i], cfg)
            for j, p in zip(idx, got, strict=True):
                preds[j] = p
        extra = {"bucket_images": {str(counts[i]): len(idx) for i, idx in groups.items()}}
        record(method + ADAPTIVE_SUFFIX, None, round(mean_tokens, 2), None, preds, t, None, extra)
    fixed = round(mean_tokens)
    for method in cfg.methods:
        if any(r["method"] == method and r["tokens"] == fixed for r in rows):
            continue
        t = time.perf_counter()
        preds = answer_with(vlm, processor, items, method, fixed, cfg)
        split = visionzip_split(fixed) if method in ("visionzip", "vispruner") else None
        record(method, None, fixed, split, preds, t, None, {"matches_adaptive_mean": True})
    return {
        **budget.to_dict(),
        "buckets_from": list(cfg.adaptive),
        "mean_tokens": round(mean_tokens, 3),
        "fixed_tokens_compared": fixed,
        "needed_mean": round(sum(needed) / len(needed), 3),
        "bucket_images": {str(counts[i]): len(idx) for i, idx in groups.items()},
    }


def paired_second_stage(rows: list[dict[str, Any]], hits: list[list[bool]]) -> None:
    """Add `vs_same_tokens` to each fixed-budget second-stage row (cdpruner, dpp): the paired McNemar test against
    every other fixed-budget row at the same token count, so the question's effect is tested on the same items."""
    fixed = [(r, ok) for r, ok in zip(rows, hits, strict=True) if not r["method"].endswith(ADAPTIVE_SUFFIX)]
    for r, ok in fixed:
        if r["method"] not in STAGE2_METHODS:
            continue
        r["vs_same_tokens"] = {
            o["method"]: mcnemar_exact(ok, o_ok)
            for o, o_ok in fixed
            if o is not r and o["tokens"] == r["tokens"] and o["method"] != TUNED_METHOD
        }


def paired_with_random(rows: list[dict[str, Any]], hits: list[list[bool]]) -> None:
    """Add `vs_random` to every row that has a random row at the same token count (same kind: fixed or
    adaptive): the paired McNemar comparison on the same questions."""
    randoms = {}
    for r, ok in zip(rows, hits, strict=True):
        if r["method"] in ("random", "random" + ADAPTIVE_SUFFIX):
            randoms[(r["method"].endswith(ADAPTIVE_SUFFIX), r["tokens"])] = ok
    for r, ok in zip(rows, hits, strict=True):
        adaptive = r["method"].endswith(ADAPTIVE_SUFFIX)
        ref = randoms.get((adaptive, r["tokens"]))
        if ref is None or r["method"].split("+")[0] == "random":
            continue
        r["vs_random"] = mcnemar_exact(ok, ref)
