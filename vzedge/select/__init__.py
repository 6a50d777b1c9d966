"""Token selectors behind one interface (`Selector`), chosen by `VisionZipConfig.selector` / `--selector`.

base.py       the interface: `SelectionInputs`, `Selector`, shared helpers
visionzip.py  `visionzip`: the released VisionZip algorithm (the default)
divprune.py   `divprune`: max-min feature diversity, no attention needed
vispruner.py  `vispruner`: attention-important tokens + similarity de-duplicated diverse ones
random.py     `random`: CLS + uniformly drawn patches (seeded baseline, not exportable)
pool.py       `pool`: region averages (baseline)
adaptive.py   a per-image token budget from the image itself, rounded to static buckets
textcond.py   `TextStage` (`cdpruner`): the *text-conditioned* second stage, conditional DPP on cached tokens given
              the question (not a `Selector`: it needs the question; `vzedge.models.textstage` runs it on a LLaVA)

`VisionZipEncoder` (what the exporter traces) and `vzedge eval` both call these, so there is one
implementation of each rule.
"""

from __future__ import annotations

from vzedge.select.adaptive import AdaptiveBudget, choose_buckets, tokens_for_mass
from vzedge.select.base import SelectionInputs, Selector
from vzedge.select.divprune import DivPruneSelector, divprune_indices
from vzedge.select.pool import PoolSelector, pool_tokens
from vzedge.select.random import RandomSelector, random_positions
from vzedge.select.textcond import TextStage, conditional_dpp_indices, text_relevance
from vzedge.select.visionzip import VisionZipSelector
from vzedge.select.vispruner import VisPrunerSelector, vispruner_indices
from vzedge.visionzip import SELECTORS

_REGISTRY: dict[str, Selector] = {
    s.name: s for s in (VisionZipSelector(), DivPruneSelector(), VisPrunerSelector(), RandomSelector(), PoolSelector())
}
assert tuple(_REGISTRY) == SELECTORS, (tuple(_REGISTRY), SELECTORS)


def get_selector(name: str) -> Selector:
    """The selector called `name` (one of SELECTORS); ValueError naming the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"selector {name!r} is not one of {SELECTORS}; use e.g. --selector divprune") from None


__all__ = [
    "SELECTORS",
    "AdaptiveBudget",
    "DivPruneSelector",
    "PoolSelector",
    "RandomSelector",
    "SelectionInputs",
    "Selector",
    "TextStage",
    "VisPrunerSelector",
    "VisionZipSelector",
    "choose_buckets",
    "conditional_dpp_indices",
    "divprune_indices",
    "get_selector",
    "pool_tokens",
    "random_positions",
    "text_relevance",
    "tokens_for_mass",
    "vispruner_indices",
]
