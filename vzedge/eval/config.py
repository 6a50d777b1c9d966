"""EvalConfig: which model, data, budgets and methods; `parse_tokens` for the CLI's budget list."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from vzedge.models.projector import CONFIG_FILE, PROJECTOR_FILE
from vzedge.synth import VARIANTS
from vzedge.visionzip import SELECTORS, VisionZipConfig

# The second stage (vzedge.select.textcond): K of the cached projected patch tokens per question by conditional
# DPP. `cdpruner` is text-conditioned; `dpp` is its ablation with relevance 1 (the question unused).
STAGE2_METHODS = ("cdpruner", "dpp")
TEXT_METHODS = ("cdpruner",)
METHODS = (*SELECTORS, *STAGE2_METHODS)  # every token selector of vzedge.select, each a row per budget
DEFAULT_METHODS = ("visionzip", "random", "pool")  # the rows eval gave before the other selectors existed
ADAPTIVE_SUFFIX = "+adaptive"
# Built-in synthetic test splits by --data name: the standard scenes and the small-regions variant.
SYNTH_DATA = {"synth" if v == "standard" else f"synth-{v}": v for v in VARIANTS}
TUNED_METHOD = "visionzip+tuned"
UNTUNED = "untuned: pass --tuned DIR (a `vzedge tune` output) to add tuned rows"
LLAVA15_PATCHES = 576
PAPER_DOMINANT, PAPER_CONTEXTUAL = 54, 10


@dataclass(frozen=True)
class EvalConfig:
    """What `vzedge eval` measures.

    data: "synth" (the held-out synthetic test split), "synth-small" (its small-regions variant: small shapes
    among distractors, a word in a corner) or a LLaVA-format JSON file; images: the folder its "image"
    paths are relative to. tokens: budgets, in LLaVA-1.5 tokens when scale is true (576 =
    all tokens). n: questions (synth: balanced over kinds; a JSON file: the first n, 0 = all).
    tuned: `vzedge tune` output folders; each adds a `visionzip+tuned` row at the token count it was tuned
    for, which must be one of the evaluated budgets (after scaling).
    adaptive: bucket budgets (LLaVA-1.5 tokens, scaled like `tokens`) for a per-image adaptive budget: each
    method gets a `METHOD+adaptive` row where every image is answered at the bucket the attention-mass rule
    (`adaptive_mass`) picks for it, plus a fixed row at the same mean token count.
    """

    model: str = "tiny"
    data: str = "synth"
    images: str | None = None
    tokens: tuple[int, ...] = (576, 192, 128, 64)
    scale: bool = True
    methods: tuple[str, ...] = DEFAULT_METHODS
    n: int = 300
    seed: int = 0
    batch_size: int = 32
    max_new_tokens: int = 10
    tuned: tuple[str, ...] = ()
    adaptive: tuple[int, ...] = ()
    adaptive_mass: float = 0.5

    @property
    def synth_variant(self) -> str | None:
        """The built-in split's variant ("standard", "small"), or None for a LLaVA-format file."""
        return SYNTH_DATA.get(self.data)

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
        if self.synth_variant is not None and self.n == 0:
            raise ValueError(f"n=0 with --data {self.data}: pass the number of synthetic test questions, e.g. --n 300")
        if self.synth_variant is None and self.images is None:
            raise ValueError(
                f"--data {self.data!r} is a LLaVA-format file: pass --images DIR, the folder of its images "
                f"(or a built-in split: {', '.join(SYNTH_DATA)})"
            )
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in self.adaptive):
            raise ValueError(f"adaptive={self.adaptive!r}: pass positive bucket budgets, e.g. --adaptive 32,64,128")
        if len(self.adaptive) == 1:
            raise ValueError("--adaptive needs at least two buckets to choose from, e.g. --adaptive 32,64,128")
        if not 0 < self.adaptive_mass <= 1:
            raise ValueError(f"adaptive_mass={self.adaptive_mass}: use a share in (0, 1], e.g. 0.5")
        if isinstance(self.tuned, (str, os.PathLike)):
            raise TypeError(f"tuned={self.tuned!r}: pass a sequence of folders, e.g. tuned=({str(self.tuned)!r},)")
        object.__setattr__(self, "tuned", tuple(os.fspath(p) for p in self.tuned))
        for folder in self.tuned:
            _check_tune_folder(folder)


def _check_tune_folder(folder: str) -> None:
    """The checks that need no model: the folder exists and holds a `vzedge tune` output."""

    if not os.path.isdir(folder):
        what = "is a file" if os.path.exists(folder) else "does not exist"
        raise ValueError(f"--tuned {folder!r} {what}; pass the --out folder of a `vzedge tune` run")
    missing = [f for f in (CONFIG_FILE, PROJECTOR_FILE) if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise ValueError(
            f"--tuned {folder!r} is not a `vzedge tune` output (no {' or '.join(missing)}); pass the folder "
            "that `vzedge tune --out DIR` wrote, or make one with `vzedge tune`"
        )


_TOKENS_RE = re.compile(r"^\d+(,\d+)*$")


def parse_tokens(text: str) -> tuple[int, ...]:
    """'576,192,128,64' -> (576, 192, 128, 64), with an error that shows the form."""
    text = text.replace(" ", "")
    if not _TOKENS_RE.match(text):
        raise ValueError(f"--tokens {text!r}: pass comma-separated positive counts, e.g. --tokens 576,192,128,64")
    return tuple(int(t) for t in text.split(","))


@dataclass(frozen=True)
class TunedRow:
    """A `--tuned` folder checked against the model: where its row goes and what it applies."""

    folder: str
    budget: int
    visionzip: VisionZipConfig
    record: dict[str, Any]  # read_tuned_projector's record: path, sha256, base, visionzip, steps, final_loss
