"""Data for projector tuning: LLaVA-format conversations -> (input_ids, labels) with VisionZip placeholders.

A record is LLaVA's instruction format, one image per conversation, any number of rounds:

    {"id": "0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nWhat colour?"},
                                                    {"from": "gpt", "value": "red"}, ...]}

The text is rendered with the model's own chat template (LLaVA-1.5's `USER: <image>\\n... ASSISTANT: ...</s>`
for the built-in model), so training sees what generation sees. The loss is taken on every gpt turn: a
token is an answer token when its characters overlap the text the template added for that turn (answer
and end-of-turn marker), found by rendering each prefix of the conversation. Templates that are not
append-only (a prefix renders differently inside the full conversation) are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vzedge import synth
from vzedge.images import ImageLimits, load_image
from vzedge.io import sha256_file

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
MISSING_IMAGE_POLICIES = ("error", "skip")
_ROLES = {"human": "user", "gpt": "assistant"}
RECORD_EXAMPLE = (
    '{"id": "0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the '
    'circle?"}, {"from": "gpt", "value": "red"}]}'
)


@dataclass(frozen=True)
class Record:
    """One conversation: `turns` are (human, gpt) pairs; the human text holds the one `<image>`."""

    index: int
    id: str
    image: Path
    turns: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Example:
    """A tokenized record. labels is IGNORE_INDEX except on answer tokens."""

    id: str
    image: Path
    input_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def answer_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def data_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of the JSON file (the images are identified by the paths it names)."""

    return sha256_file(path)


def read_records(data: str | os.PathLike[str], images: str | os.PathLike[str], on_missing_image: str = "error"):
    """Parse and check a LLaVA-format JSON file. Returns (records, skipped ids).

    Every problem names the record (index and id). A missing image raises, or with
    `on_missing_image="skip"` is logged and the record left out. An empty result raises.
    """
    if on_missing_image not in MISSING_IMAGE_POLICIES:
        raise ValueError(f"on_missing_image={on_missing_image!r}: use one of {MISSING_IMAGE_POLICIES}")
    data, images = Path(data), Path(images)
    if not data.is_file():
        raise ValueError(f"--data {str(data)!r} is not a file; pass a LLaVA-format JSON file (`vzedge make-data`)")
    if not images.is_dir():
        raise ValueError(f"--images {str(images)!r} is not a folder; pass the folder the records' 'image' paths are in")
    try:
        raw = json.loads(data.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{data}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{data}: not UTF-8 text ({err})") from err
    if not isinstance(raw, list):
        raise ValueError(f"{data}: expected a JSON list of records like {RECORD_EXAMPLE}, got a {type(raw).__name__}")
    if not raw:
        raise ValueError(f"{data}: the data set is empty; it needs at least one record like {RECORD_EXAMPLE}")
    records: list[Record] = []
    skipped: list[str] = []
    for i, rec in enumerate(raw):
        where = f"{data}: record {i}" + (f" (id {rec.get('id')!r})" if isinstance(rec, dict) and "id" in rec else "")
        record = _parse_record(i, rec, where, images)
        if not record.image.is_file():
            if on_missing_image == "error":
                raise ValueError(
                    f"{where}: image {str(record.image)!r} does not exist; check --images, or pass "
                    "--missing-images skip to leave such records out"
                )
            log.warning("%s: image %s does not exist; skipped", where, record.image)
            skipped.append(record.id)
            continue
        records.append(record)
    if not records:
        raise ValueError(f"{data}: no usable records: all {len(raw)} name images missing from {images}")
    if skipped:
        log.warning("%d of %d records skipped for missing images", len(skipped), len(raw))
    return records, skipped


def _parse_record(i: int, rec: Any, where: str, images: Path) -> Record:
    if not isinstance(rec, dict):
        raise ValueError(f"{where} is a {type(rec).__name__}, not an object like {RECORD_EXAMPLE}")
    missing = [k for k in ("image", "conversations") if k not in rec]
    if missing:
        raise ValueError(f"{where} has no {' or '.join(repr(k) for k in missing)}; expected {RECORD_EXAMPLE}")
    if not isinstance(rec["image"], str) or not rec["image"]:
        raise ValueError(f"{where}: 'image' must be a file name relative to --images, got {rec['image']!r}")
    conv = rec["conversations"]
    if not isinstance(conv, list) or len(conv) < 2:
        raise ValueError(f"{where}: 'conversations' must be a list of human/gpt turns, at least one of each")
    if len(conv) % 2:
        raise ValueError(f"{where}: 'conversations' has {len(conv)} turns; it must alternate human, gpt and end on gpt")
    turns = []
    for j, turn in enumerate(conv):
        want = "human" if j % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want:
            got = turn.get("from") if isinstance(turn, dict) else type(turn).__name__
            raise ValueError(f"{where}: turn {j} must be from {want!r} (turns alternate human, gpt), got {got!r}")
        if not isinstance(turn.get("value"), str) or not turn["value"].strip():
            raise ValueError(f"{where}: turn {j} needs a non-empty string 'value'")
    for j in range(0, len(conv), 2):
        if IMAGE_PLACEHOLDER in conv[j + 1]["value"]:
            raise ValueError(f"{where}: turn {j + 1} (gpt) holds '<image>'; only human turns may")
        turns.append((conv[j]["value"], conv[j + 1]["value"]))
    count = sum(h.count(IMAGE_PLACEHOLDER) for h, _ in turns)
    if count != 1:
        what = "no '<image>' token" if count == 0 else f"{count} '<image>' tokens"
        raise ValueError(
            f"{where}: the conversation has {what}; projector tuning needs exactly one image per conversation, "
            "marked by '<image>' in a human turn (e.g. \"<image>\\nWhat is shown?\")"
        )
    return Record(i, str(rec.get("id", i)), images / rec["image"], tuple(turns))


# --- rendering and tokenization ---------------------------------------------------------------------------


def _messages(turns: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
    # The human text goes in verbatim, '<image>' included: LLaVA-1.5's training format is the template's
    # "USER: <image>\n..." with the placeholder where the data put it.
    out = []
    for human, gpt in turns:
        out.append({"role": "user", "content": [{"type": "text", "text": human}]})
        out.append({"role": "assistant", "content": [{"type": "text", "text": gpt}]})
    return out


def _render(processor: Any, messages: list[dict[str, Any]], generation: bool) -> str:
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    # No chat template: LLaVA-1.5's conversation format.
    eos = processor.tokenizer.eos_token or ""
    parts = []
    for m in messages:
        text = m["content"][0]["text"]
        parts.append(f"USER: {text} " if m["role"] == "user" else f"ASSISTANT: {text}{eos}")
    return "".join(parts) + ("ASSISTANT:" if generation else "")


def answer_spans(processor: Any, turns: tuple[tuple[str, str], ...]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span each gpt turn added (answer + end-of-turn marker)."""
    messages = _messages(turns)
    full = _render(processor, messages, generation=False)
    spans = []
    for i in range(len(turns)):
        prompt = _render(processor, messages[: 2 * i + 1], generation=True)
        upto = _render(processor, messages[: 2 * i + 2], generation=False)
        if not (full.startswith(prompt) and full.startswith(upto) and len(upto) > len(prompt)):
            raise ValueError(
                "the processor's chat template is not append-only (a prefix of the conversation renders "
                "differently inside the whole), so answer tokens cannot be located; use a LLaVA-1.5 template"
            )
        spans.append((len(prompt), len(upto)))
    return full, spans


def encode(record: Record, processor: Any, num_image_tokens: int, max_length: int) -> Example | None:
    """Tokenize a record with `num_image_tokens` image placeholders. None (logged) if truncation to
    `max_length` would cut the image or leave no answer token."""
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
    turns = tuple((h.replace(IMAGE_PLACEHOLDER, image_token), a) for h, a in record.turns)
    text, spans = answer_spans(processor, turns)
    # Expanding the placeholder shifts every later character equally in each prefix: spans are computed on
    # the expanded text so the offsets below line up.
    expanded = text.replace(image_token, image_token * num_image_tokens)
    shift = len(image_token) * (num_image_tokens - 1)
    pos = text.index(image_token)
    spans = [(s + shift if s > pos else s, e + shift if e > pos else e) for s, e in spans]
    bos = tokenizer.bos_token
    enc = tokenizer(
        expanded,
        return_offsets_mapping=True,
        add_special_tokens=not (bos and expanded.startswith(bos)),
    )
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for j, (s, e) in enumerate(enc["offset_mapping"]):
        if e > s and any(s < se and e > ss for ss, se in spans):
            labels[j] = ids[j]
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    n_image = int((ids == image_id).sum())
    if n_image != num_image_tokens:
        raise ValueError(
            f"record {record.index} (id {record.id!r}) tokenizes to {n_image} image tokens, expected "
            f"{num_image_tokens}: the processor's image token {image_token!r} is not a single token"
        )
    if len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
        if int((ids == image_id).sum()) != num_image_tokens or not (labels != IGNORE_INDEX).any():
            log.warning(
                "record %d (id %r) is longer than max_length=%d tokens; skipped", record.index, record.id, max_length
            )
            return None
    if not (labels != IGNORE_INDEX).any():
        raise ValueError(f"record {record.index} (id {record.id!r}) has no answer tokens after tokenization")
    return Example(record.id, record.image, ids, labels)


def collate(examples: list[Example], processor: Any) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask/labels and the images' pixel_values."""

    pad = processor.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = e.input_ids, e.labels, 1
    images = [load_image(str(e.image)) for e in examples]
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values}


def examples_sha256(examples: list[Example]) -> str:
    """Hash of the tokenized data (ids and labels): what the loss saw. Image paths are left out, so a run
    resumes from another working directory; the JSON file's own hash covers the image names."""
    h = hashlib.sha256()
    for e in examples:
        h.update(e.id.encode())
        h.update(e.input_ids.numpy().tobytes())
        h.update(e.labels.numpy().tobytes())
    return h.hexdigest()


def make_data(
    out: str | os.PathLike[str],
    n: int = 1000,
    split: str = "train",
    seed: int = 0,
    size: int = 224,
    variant: str = "standard",
    limits: ImageLimits | None = None,
) -> str:
    """Write `n` synthetic VQA samples as LLaVA-format `out/data.json` + `out/images/` (offline).

    Returns the JSON path; `vzedge tune --data OUT/data.json --images OUT` reads it. `limits` bound each scene's
    size x size pixels (default `ImageLimits()`: a --size of 100000 would draw 30 GB scenes).
    """

    if Path(out).exists():
        raise FileExistsError(f"--out {out} exists; make-data writes a new folder, choose another path")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: pass --n >= 1 samples")
    (limits or ImageLimits()).check(size, size, f"--size {size}: each scene")
    if variant not in synth.VARIANTS:
        raise ValueError(f"variant={variant!r}: use one of {synth.VARIANTS}")
    return synth.export_llava(str(out), split=split, n=n, seed=seed, size=size, variant=variant)
