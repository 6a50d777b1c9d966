"""Accuracy against the visual-token budget (`vzedge eval`): every token selector and the baselines a reader needs.

config.py  EvalConfig, method names, built-in splits (synth, synth-small), `parse_tokens`
data.py    the questions (built-in synthetic splits or a LLaVA-format file), normalisation, scoring, Wilson
           intervals, the paired McNemar test
reduce.py  the token reducers: every vzedge.select selector through apply_visionzip
run.py     `evaluate(cfg)`: every method at every budget on the same questions
report.py  the Markdown table and the accuracy-vs-tokens plot
"""

from __future__ import annotations

from vzedge.eval.config import METHODS, TUNED_METHOD, EvalConfig, TunedRow, parse_tokens
from vzedge.eval.data import Item, llava_items, mcnemar_exact, normalize, score, synth_items, wilson_interval
from vzedge.eval.reduce import pool_tokens, random_select, reduced_tokens, scaled_budget, visionzip_split
from vzedge.eval.report import markdown_table, plot
from vzedge.eval.run import answer, evaluate, evaluate_full_tokens

__all__ = [
    "METHODS",
    "TUNED_METHOD",
    "EvalConfig",
    "Item",
    "TunedRow",
    "answer",
    "evaluate",
    "evaluate_full_tokens",
    "llava_items",
    "markdown_table",
    "mcnemar_exact",
    "normalize",
    "parse_tokens",
    "plot",
    "pool_tokens",
    "random_select",
    "reduced_tokens",
    "scaled_budget",
    "score",
    "synth_items",
    "visionzip_split",
    "wilson_interval",
]
