"""Questions to evaluate on (the built-in synthetic split or a LLaVA-format file), answer normalisation and scoring."""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field
from typing import Any

from vzedge import synth
from vzedge.images import load_image
from vzedge.models.tiny import PROMPT_TEMPLATE


@dataclass
class Item:
    id: str
    kind: str
    prompt: str  # holds one "<image>"
    answer: str
    image: Any = field(repr=False)  # PIL image
    question: str = ""  # the question alone (no template, no "<image>"): what a text-conditioned stage reads


def synth_items(n: int, seed: int, image_size: int, variant: str = "standard") -> list[Item]:
    """The held-out synthetic test split (or its `variant`), kinds balanced, rendered at the model's image size."""

    return [
        Item(
            s.id,
            s.kind,
            PROMPT_TEMPLATE.format(question=s.question),
            s.answer,
            synth.render(s.scene, image_size),
            s.question,
        )
        for s in synth.samples("test", n, seed=seed, variant=variant)
    ]


def llava_items(path: str, images: str, n: int = 0) -> list[Item]:
    """Records of a LLaVA-format file: [{"id", "image", "conversations": [{"from": "human", "value":
    "<image>\\n..."}, {"from": "gpt", "value": "..."}]}]. The first human/gpt pair of each record is the
    question and the reference answer; an optional "kind" (or "category") groups the accuracy."""

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
        prompt, text = f"USER: {question} ASSISTANT:", question.replace("<image>", "").strip()
        items.append(Item(str(rec.get("id", i)), kind, prompt, answer, load_image(image_path), text))
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


def score(items: list[Item], predictions: list[str]) -> dict[str, float]:
    """Exact-match accuracy per kind and overall (mean over questions)."""
    per: dict[str, list[bool]] = {}
    for it, pred in zip(items, predictions, strict=True):
        per.setdefault(it.kind, []).append(normalize(pred) == normalize(it.answer))
    acc = {kind: sum(v) / len(v) for kind, v in sorted(per.items())}
    acc["overall"] = sum(sum(v) for v in per.values()) / max(1, len(items))
    return acc


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (better than the normal one near 0 and 1)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(a: list[bool], b: list[bool]) -> dict[str, float]:
    """Paired comparison of two methods on the same questions: a_only (a right, b wrong), b_only, and the exact
    two-sided McNemar p-value (binomial test on the discordant pairs). Far more sensitive than comparing two
    independent intervals, since both methods answer the same questions."""
    from math import comb

    a_only = sum(x and not y for x, y in zip(a, b, strict=True))
    b_only = sum(y and not x for x, y in zip(a, b, strict=True))
    n = a_only + b_only
    tail = sum(comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": round(min(1.0, 2 * tail), 6)}


def correct(items: list[Item], predictions: list[str]) -> list[bool]:
    """Per question: exact match after normalize()."""
    return [normalize(p) == normalize(it.answer) for it, p in zip(items, predictions, strict=True)]


def baselines(items: list[Item], data: str, variant: str | None = "standard") -> dict[str, Any]:
    if variant is None:
        return {}
    from collections import Counter

    kinds = sorted({it.kind for it in items})
    chance = {k: synth.chance(k) for k in kinds}
    chance["overall"] = sum(synth.chance(it.kind) for it in items) / len(items)
    # The best blind guess: each kind's most frequent answer in (a large sample of) the train split.
    train = synth.samples("train", 1200, variant=variant)
    top = {k: Counter(s.answer for s in train if s.kind == k).most_common(1)[0][0] for k in kinds}
    prior = {
        k: sum(it.answer == top[k] for it in items if it.kind == k) / sum(it.kind == k for it in items) for k in kinds
    }
    prior["overall"] = sum(it.answer == top[it.kind] for it in items) / len(items)
    return {"chance_uniform": chance, "prior_majority": prior, "prior_answers": top}
