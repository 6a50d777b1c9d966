"""Accuracy against the visual-token budget: VisionZip and the baselines a reader needs to judge it.

For each budget K the same LLaVA model answers the same questions (greedy decoding, exact match after
normalisation) on K visual tokens per image, chosen by:

- `visionzip`: `apply_visionzip` (the library path), dominant:contextual split in the paper's 54:10 ratio;
- `random`: CLS plus K-1 patches drawn uniformly (seeded), in sequence order;
- `pool`: K averages of near-square patch regions (rows split into bands, each band pooled along the
  columns to its share of K), CLS not used.

All three take the output of the model's feature layer (-2) and go through the model's own projector;
`full` is the stock model on all its patches. Budgets are given in LLaVA-1.5 tokens (576 patches) and
scaled to the model's grid unless `scale=False`.

With `tuned` folders (`vzedge tune` outputs), each adds a `visionzip+tuned` row at the token count it was
tuned for: VisionZip with the folder's config and its tuned projector weights (through
`apply_visionzip(projector=...)`), the original weights put back bit for bit afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vzedge.bench import conditions
from vzedge.visionzip import VisionZipConfig

log = logging.getLogger(__name__)

METHODS = ("visionzip", "random", "pool")
TUNED_METHOD = "visionzip+tuned"
UNTUNED = "untuned: pass --tuned DIR (a `vzedge tune` output) to add tuned rows"
LLAVA15_PATCHES = 576
PAPER_DOMINANT, PAPER_CONTEXTUAL = 54, 10


@dataclass(frozen=True)
class EvalConfig:
    """What `vzedge eval` measures.

    data: "synth" (the held-out synthetic test split) or a LLaVA-format JSON file; images: the folder
    its "image" paths are relative to. tokens: budgets, in LLaVA-1.5 tokens when scale is true (576 =
    all tokens). n: questions (synth: balanced over kinds; a JSON file: the first n, 0 = all).
    tuned: `vzedge tune` output folders; each adds a `visionzip+tuned` row at the token count it was tuned
    for, which must be one of the evaluated budgets (after scaling).
    """

    model: str = "tiny"
    data: str = "synth"
    images: str | None = None
    tokens: tuple[int, ...] = (576, 192, 128, 64)
    scale: bool = True
    methods: tuple[str, ...] = METHODS
    n: int = 300
    seed: int = 0
    batch_size: int = 32
    max_new_tokens: int = 10
    tuned: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.tokens or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in self.tokens):
            raise ValueError(f"tokens={self.tokens!r}: pass positive token counts, e.g. --tokens 576,192,128,64")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods={self.methods!r}: use a non-empty subset of {METHODS}")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.n < 0:
            raise ValueError(f"n={self.n} is negative; use n >= 1 (or 0 for all records of a JSON file)")
        if self.data == "synth" and self.n == 0:
            raise ValueError("n=0 with --data synth: pass the number of synthetic test questions, e.g. --n 300")
        if self.data != "synth" and self.images is None:
            raise ValueError(
                f"--data {self.data!r} is a LLaVA-format file: pass --images DIR, the folder of its images"
            )
        if isinstance(self.tuned, (str, os.PathLike)):
            raise TypeError(f"tuned={self.tuned!r}: pass a sequence of folders, e.g. tuned=({str(self.tuned)!r},)")
        object.__setattr__(self, "tuned", tuple(os.fspath(p) for p in self.tuned))
        for folder in self.tuned:
            _check_tune_folder(folder)


def _check_tune_folder(folder: str) -> None:
    """The checks that need no model: the folder exists and holds a `vzedge tune` output."""
    from vzedge.tune import CONFIG_FILE, PROJECTOR_FILE

    if not os.path.isdir(folder):
        what = "is a file" if os.path.exists(folder) else "does not exist"
        raise ValueError(f"--tuned {folder!r} {what}; pass the --out folder of a `vzedge tune` run")
    missing = [f for f in (CONFIG_FILE, PROJECTOR_FILE) if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise ValueError(
            f"--tuned {folder!r} is not a `vzedge tune` output (no {' or '.join(missing)}); pass the folder "
            "that `vzedge tune --out DIR` wrote, or make one with `vzedge tune`"
        )


@dataclass
class Item:
    id: str
    kind: str
    prompt: str  # holds one "<image>"
    answer: str
    image: Any = field(repr=False)  # PIL image


# --- data -------------------------------------------------------------------------------------------------


def synth_items(n: int, seed: int, image_size: int) -> list[Item]:
    """The held-out synthetic test split, kinds balanced, rendered at the model's image size."""
    from vzedge import synth
    from vzedge.models.tiny import PROMPT_TEMPLATE

    return [
        Item(s.id, s.kind, PROMPT_TEMPLATE.format(question=s.question), s.answer, synth.render(s.scene, image_size))
        for s in synth.samples("test", n, seed=seed)
    ]


def llava_items(path: str, images: str, n: int = 0) -> list[Item]:
    """Records of a LLaVA-format file: [{"id", "image", "conversations": [{"from": "human", "value":
    "<image>\\n..."}, {"from": "gpt", "value": "..."}]}]. The first human/gpt pair of each record is the
    question and the reference answer; an optional "kind" (or "category") groups the accuracy."""
    from vzedge.images import load_image

    if not os.path.isfile(path):
        raise ValueError(f"--data {path!r} does not exist; pass 'synth' or a LLaVA-format JSON file")
    if not os.path.isdir(images):
        raise ValueError(f"--images {images!r} is not a folder; pass the folder the records' 'image' paths are in")
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of records like {_RECORD_EXAMPLE}")
    items = []
    for i, rec in enumerate(records[: n or None]):
        where = f"{path}: record {i}" + (f" (id {rec.get('id')!r})" if isinstance(rec, dict) and "id" in rec else "")
        if not isinstance(rec, dict):
            raise ValueError(f"{where} is a {type(rec).__name__}, not an object like {_RECORD_EXAMPLE}")
        missing = [k for k in ("image", "conversations") if k not in rec]
        if missing:
            raise ValueError(f"{where} has no {' or '.join(repr(k) for k in missing)}; expected {_RECORD_EXAMPLE}")
        conv = rec["conversations"]
        if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(c, dict) for c in conv[:2]):
            raise ValueError(f"{where}: 'conversations' must be a list of at least a human and a gpt turn")
        human, gpt = conv[0], conv[1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise ValueError(
                f"{where}: the first two turns must be from 'human' then 'gpt', "
                f"got {human.get('from')!r} then {gpt.get('from')!r}"
            )
        question, answer = human.get("value"), gpt.get("value")
        if not isinstance(question, str) or not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"{where}: the human and gpt turns need non-empty string 'value's")
        if question.count("<image>") != 1:
            raise ValueError(
                f"{where}: the human turn must hold exactly one '<image>', found {question.count('<image>')}"
            )
        image_path = os.path.join(images, str(rec["image"]))
        if not os.path.isfile(image_path):
            raise ValueError(f"{where}: image {image_path!r} does not exist (check --images)")
        kind = str(rec.get("kind", rec.get("category", "all")))
        items.append(Item(str(rec.get("id", i)), kind, f"USER: {question} ASSISTANT:", answer, load_image(image_path)))
    return items


_RECORD_EXAMPLE = (
    '{"id": "0", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the '
    'circle?"}, {"from": "gpt", "value": "red"}]}'
)


def normalize(text: str) -> str:
    """Lower case, no surrounding punctuation or articles, single spaces: 'The Red.' -> 'red'."""
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    words = [w for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


# --- token reducers ----------------------------------------------------------------------------------------


def scaled_budget(tokens: int, num_patches: int, scale: bool) -> int:
    """A LLaVA-1.5 budget (of 576 patches) on a grid of `num_patches`; full stays full."""
    if not scale:
        return min(tokens, num_patches)
    return min(num_patches, max(2, round(tokens * num_patches / LLAVA15_PATCHES)))


def visionzip_split(k: int) -> tuple[int, int]:
    """The paper's dominant:contextual ratio (54:10) at k tokens."""
    dominant = max(1, round(k * PAPER_DOMINANT / (PAPER_DOMINANT + PAPER_CONTEXTUAL)))
    return dominant, k - dominant


def feature_layer_tokens(tower, layer: int, pixel_values: torch.Tensor) -> torch.Tensor:
    """The raw output of encoder layer `layer` (as VisionZip selects it): [B, N(+CLS), D]."""
    x = tower.embed(pixel_values.to(next(tower.module.parameters()).dtype))
    for blk in tower.layers[: layer % tower.num_layers + 1]:
        x = blk(x, None)
    return x


def random_select(hidden: torch.Tensor, k: int, has_cls: bool, generator: torch.Generator) -> torch.Tensor:
    """CLS (if any) plus k - has_cls uniformly drawn patches per image, in sequence order."""
    b, n, _ = hidden.shape
    start = int(has_cls)
    scores = torch.rand(b, n - start, generator=generator)
    idx = torch.topk(scores, k - start, dim=1).indices.sort(dim=1).values + start
    if has_cls:
        idx = torch.cat([torch.zeros(b, 1, dtype=torch.long), idx], dim=1)
    return torch.gather(hidden, 1, idx.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def pool_tokens(patches: torch.Tensor, grid: int, k: int) -> torch.Tensor:
    """k averages of near-square regions of a grid x grid patch map (raster order): [B, k, D].

    Rows are split into round(sqrt(k)) bands; band i gets k // bands (+1 for the first k % bands) cells,
    each the mean over the band's rows and an adaptive slice of its columns. For k = h * h with h
    dividing the grid this is plain h x h average pooling.
    """
    b, p, d = patches.shape
    assert p == grid * grid, (p, grid)
    x = patches.reshape(b, grid, grid, d)
    bands = max(1, min(grid, round(math.sqrt(k))))
    out = []
    for i in range(bands):
        r0, r1 = (i * grid) // bands, -(-(i + 1) * grid // bands)
        cells = k // bands + int(i < k % bands)
        row = x[:, r0:r1].mean(dim=1)  # [B, grid, D]
        out.append(F.adaptive_avg_pool1d(row.transpose(1, 2), cells).transpose(1, 2))
    return torch.cat(out, dim=1)


@contextlib.contextmanager
def reduced_tokens(
    vlm: nn.Module,
    method: str,
    k: int,
    seed: int,
    visionzip: VisionZipConfig | None = None,
    projector: str | os.PathLike[str] | None = None,
) -> Iterator[None]:
    """Make `vlm` see k visual tokens per image chosen by `method` (VisionZip through apply_visionzip).

    visionzip: the config for "visionzip"/"visionzip+tuned" (default: the paper's split at k); projector:
    for "visionzip+tuned", the `vzedge tune` folder whose weights replace the projector's until exit.
    """
    from vzedge.models import adapt_vision_tower
    from vzedge.models.llava import _llava_parts, apply_visionzip, remove_visionzip

    layer = int(getattr(vlm.config, "vision_feature_layer", -2))
    if (projector is not None) != (method == TUNED_METHOD):
        raise ValueError(f"method {method!r} with projector={projector!r}: {TUNED_METHOD!r} needs a tuned folder")
    if method in ("visionzip", TUNED_METHOD):
        vz = visionzip or VisionZipConfig(*visionzip_split(k), layer=layer)
        assert vz.num_tokens == k, (vz, k)
        # remove_visionzip puts the projector's original weights back (copied, so bit for bit).
        apply_visionzip(vlm, vz, projector=projector)
        try:
            yield
        finally:
            remove_visionzip(vlm)
        return
    inner = _llava_parts(vlm)
    tower = adapt_vision_tower(inner.vision_tower)
    projector = inner.multi_modal_projector
    generator = torch.Generator().manual_seed(seed)

    def get_image_features(pixel_values: torch.Tensor, *args: Any, **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        hidden = feature_layer_tokens(tower, layer, pixel_values)
        if method == "random":
            tokens = random_select(hidden, k, tower.has_cls, generator)
        else:
            tokens = pool_tokens(hidden[:, int(tower.has_cls) :], tower.grid, k)
        features = projector(tokens)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=list(features))

    vars(inner)["get_image_features"] = get_image_features
    try:
        yield
    finally:
        del vars(inner)["get_image_features"]


# --- answering and scoring ---------------------------------------------------------------------------------


def adapt_tower(vlm: nn.Module):
    from vzedge.models import adapt_vision_tower
    from vzedge.models.llava import _llava_parts

    return adapt_vision_tower(_llava_parts(vlm).vision_tower)


def stock_image_tokens(vlm: nn.Module) -> int:
    vcfg = vlm.config.vision_config
    n = (vcfg.image_size // vcfg.patch_size) ** 2
    return n if getattr(vlm.config, "vision_feature_select_strategy", "default") == "default" else n + 1


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


def score(items: list[Item], predictions: list[str]) -> dict[str, float]:
    """Exact-match accuracy per kind and overall (mean over questions)."""
    per: dict[str, list[bool]] = {}
    for it, pred in zip(items, predictions, strict=True):
        per.setdefault(it.kind, []).append(normalize(pred) == normalize(it.answer))
    acc = {kind: sum(v) / len(v) for kind, v in sorted(per.items())}
    acc["overall"] = sum(sum(v) for v in per.values()) / max(1, len(items))
    return acc


def evaluate_full_tokens(vlm: nn.Module, processor: Any, samples: list[Any], batch_size: int = 32) -> dict[str, float]:
    """Accuracy at full tokens on synth samples (what the training script records)."""
    from vzedge import synth

    size = vlm.config.vision_config.image_size
    items = [
        Item(s.id, s.kind, f"USER: <image>\n{s.question} ASSISTANT:", s.answer, synth.render(s.scene, size))
        for s in samples
    ]
    preds = answer(vlm, processor, items, stock_image_tokens(vlm), batch_size, 10)
    return {k: round(v, 4) for k, v in score(items, preds).items()}


@torch.no_grad()
def attention_on_objects(vlm: nn.Module, processor: Any, n: int, seed: int, k: int) -> dict[str, float]:
    """Is CLS attention informative? On n synth test scenes: the share of the CLS row's attention (layer
    -2, patches only) that falls on shape or text patches, the share of VisionZip's dominant patches
    (at k tokens) that are such patches, and the share of the image those patches cover."""
    from vzedge import synth
    from vzedge.encoder import VisionZipEncoder

    inner = vlm.model
    vcfg = vlm.config.vision_config
    dominant, contextual = visionzip_split(k)
    layer = int(getattr(vlm.config, "vision_feature_layer", -2))
    enc = VisionZipEncoder(inner.vision_tower, VisionZipConfig(dominant=dominant, contextual=contextual, layer=layer))
    scenes = [s.scene for s in synth.samples("test", n, seed=seed)]
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


# --- the evaluation ----------------------------------------------------------------------------------------


def _baselines(items: list[Item], data: str) -> dict[str, Any]:
    if data != "synth":
        return {}
    from collections import Counter

    from vzedge import synth

    kinds = sorted({it.kind for it in items})
    chance = {k: synth.chance(k) for k in kinds}
    chance["overall"] = sum(synth.chance(it.kind) for it in items) / len(items)
    # The best blind guess: each kind's most frequent answer in (a large sample of) the train split.
    train = synth.samples("train", 1200)
    top = {k: Counter(s.answer for s in train if s.kind == k).most_common(1)[0][0] for k in kinds}
    prior = {
        k: sum(it.answer == top[k] for it in items if it.kind == k) / sum(it.kind == k for it in items) for k in kinds
    }
    prior["overall"] = sum(it.answer == top[it.kind] for it in items) / len(items)
    return {"chance_uniform": chance, "prior_majority": prior, "prior_answers": top}


@dataclass(frozen=True)
class TunedRow:
    """A `--tuned` folder checked against the model: where its row goes and what it applies."""

    folder: str
    budget: int
    visionzip: VisionZipConfig
    record: dict[str, Any]  # read_tuned_projector's record: path, sha256, base, visionzip, steps, final_loss


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
    from vzedge.tune import read_tune_config, read_tuned_projector

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
    from vzedge.models.loading import load_model

    loaded = load_model(cfg.model)
    if loaded.vlm is None or loaded.processor is None:
        raise ValueError(f"{cfg.model!r} is a bare vision encoder; eval needs a LLaVA model (e.g. --model tiny)")
    vlm, processor = loaded.vlm.eval(), loaded.processor
    vcfg = vlm.config.vision_config
    grid = vcfg.image_size // vcfg.patch_size
    num_patches = grid * grid
    plan = plan_tuned(cfg, vlm, num_patches)  # before any row runs: a bad folder fails fast
    if cfg.data == "synth":
        items = synth_items(cfg.n, cfg.seed, vcfg.image_size)
    else:
        items = llava_items(cfg.data, cfg.images or "", cfg.n)
    stock = stock_image_tokens(vlm)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def run(
        method: str, budget: int, k: int, split: tuple[int, int] | None, weights: dict[str, Any] | None = None
    ) -> None:
        t = time.perf_counter()
        preds = answer(vlm, processor, items, k, cfg.batch_size, cfg.max_new_tokens)
        acc = score(items, preds)
        rows.append(
            {
                "method": method,
                "budget": budget,
                "tokens": k,
                "dominant": split[0] if split else None,
                "contextual": split[1] if split else None,
                "accuracy": {key: round(v, 4) for key, v in acc.items()},
                "projector_weights": weights,
                "seconds": round(time.perf_counter() - t, 2),
            }
        )
        log.info(
            "%-15s budget %4d -> %3d tokens: overall %.3f (%.1f s)",
            method,
            budget,
            k,
            acc["overall"],
            rows[-1]["seconds"],
        )

    budgets = sorted(set(cfg.tokens), reverse=True)
    run("full", max(budgets[0], LLAVA15_PATCHES if cfg.scale else num_patches), stock, None)
    for budget in budgets:
        k = scaled_budget(budget, num_patches, cfg.scale)
        if k >= num_patches:
            continue  # the full row already covers it
        for method in cfg.methods:
            split = visionzip_split(k) if method == "visionzip" else None
            with reduced_tokens(vlm, method, k, cfg.seed):
                run(method, budget, k, split)
        for tuned in (t for t in plan if t.budget == budget):
            with reduced_tokens(vlm, TUNED_METHOD, k, cfg.seed, visionzip=tuned.visionzip, projector=tuned.folder):
                run(TUNED_METHOD, budget, k, (tuned.visionzip.dominant, tuned.visionzip.contextual), tuned.record)
    full = rows[0]["accuracy"]["overall"]
    for r in rows:
        r["relative_to_full"] = round(r["accuracy"]["overall"] / full, 4) if full > 0 else None
    smallest = min(r["tokens"] for r in rows)
    diag = None
    if cfg.data == "synth" and getattr(adapt_tower(vlm), "has_cls", False) and smallest < num_patches:
        diag = attention_on_objects(vlm, processor, min(cfg.n, 100), cfg.seed, smallest)
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
        "projector_tuning": _tuning_summary(plan),
        "baselines": _baselines(items, cfg.data),
        "attention": diag,
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


def _tuning_summary(plan: list[TunedRow]) -> str:
    if not plan:
        return UNTUNED
    rows = "; ".join(
        f"{t.folder} ({t.visionzip.num_tokens} tokens, {t.visionzip.dominant}+{t.visionzip.contextual})" for t in plan
    )
    return f"{TUNED_METHOD} rows use the tuned projector of {rows}; all other rows the model's own"


def markdown_table(result: dict[str, Any]) -> str:
    """Budgets as rows, methods side by side, accuracy per kind: what the README shows."""
    rows = result["rows"]
    kinds = [k for k in rows[0]["accuracy"] if k != "overall"]
    head = ["method", "budget", "tokens", "overall", "% of full", *kinds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        method = r["method"] + (f" {r['dominant']}+{r['contextual']}" if r["dominant"] is not None else "")
        if r.get("projector_weights"):
            method += f" ({os.path.basename(os.path.normpath(r['projector_weights']['path']))})"
        cells = [
            method,
            str(r["budget"]),
            str(r["tokens"]),
            f"{100 * r['accuracy']['overall']:.1f}",
            f"{100 * r['relative_to_full']:.0f}%" if r["relative_to_full"] is not None else "-",
            *(f"{100 * r['accuracy'][k]:.0f}" for k in kinds),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    base = result.get("baselines") or {}
    for name, label in (("chance_uniform", "chance (uniform)"), ("prior_majority", "blind prior (majority)")):
        if name in base:
            b = base[name]
            lines.append(
                "| "
                + " | ".join(
                    [label, "-", "0", f"{100 * b['overall']:.1f}", "-", *(f"{100 * b.get(k, 0):.0f}" for k in kinds)]
                )
                + " |"
            )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Overall accuracy against visual tokens, one line per method (tuned rows their own series), full and
    chance as references."""
    from vzedge._deps import require
    from vzedge.io import atomic_path

    mpl = require("matplotlib", "vzedge eval --plot")
    mpl.use("Agg")
    plt = require("matplotlib.pyplot", "vzedge eval --plot")
    rows = result["rows"]
    full = rows[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for method, style in (("visionzip", "o-"), ("random", "s--"), ("pool", "^:"), (TUNED_METHOD, "D-.")):
        pts = sorted((r["tokens"], r["accuracy"]["overall"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, label=method)
    ax.axhline(100 * full["accuracy"]["overall"], color="k", lw=1, label=f"all {full['tokens']} tokens")
    base = result.get("baselines") or {}
    if "chance_uniform" in base:
        ax.axhline(100 * base["chance_uniform"]["overall"], color="grey", ls="--", lw=1, label="chance")
    if "prior_majority" in base:
        ax.axhline(100 * base["prior_majority"]["overall"], color="grey", ls=":", lw=1, label="blind prior")
    ax.set_xlabel(f"visual tokens per image (of {full['tokens']})")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{result['model']} on {os.path.basename(result['data'])}: {result['questions']} questions")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


_TOKENS_RE = re.compile(r"^\d+(,\d+)*$")


def parse_tokens(text: str) -> tuple[int, ...]:
    """'576,192,128,64' -> (576, 192, 128, 64), with an error that shows the form."""
    text = text.replace(" ", "")
    if not _TOKENS_RE.match(text):
        raise ValueError(f"--tokens {text!r}: pass comma-separated positive counts, e.g. --tokens 576,192,128,64")
    return tuple(int(t) for t in text.split(","))
