"""The evaluation's Markdown table and accuracy-vs-tokens plot."""

from __future__ import annotations

import os
from typing import Any

from vzedge._deps import require
from vzedge.eval.config import ADAPTIVE_SUFFIX, METHODS, TEXT_METHODS, TUNED_METHOD, UNTUNED, TunedRow
from vzedge.io import atomic_path


def tuning_summary(plan: list[TunedRow]) -> str:
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
    head = ["method", "budget", "tokens", "overall", "95% CI", "p vs random", "% of full", *kinds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        method = r["method"] + (f" {r['dominant']}+{r['contextual']}" if r["dominant"] is not None else "")
        if r.get("text_conditioned"):
            method += " (text-conditioned)"
        if r.get("projector_weights"):
            method += f" ({os.path.basename(os.path.normpath(r['projector_weights']['path']))})"
        ci = f"{100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}" if "ci_low" in r else "-"
        cells = [
            method,
            "-" if r["budget"] is None else str(r["budget"]),
            str(r["tokens"]),
            f"{100 * r['accuracy']['overall']:.1f}",
            ci,
            f"{r['vs_random']['p_value']:.2g}" if r.get("vs_random") else "-",
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
                    [
                        label,
                        "-",
                        "0",
                        f"{100 * b['overall']:.1f}",
                        "-",
                        "-",
                        "-",
                        *(f"{100 * b.get(k, 0):.0f}" for k in kinds),
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Overall accuracy against visual tokens, one line per method (tuned rows their own series), full and
    chance as references."""

    mpl = require("matplotlib", "vzedge eval --plot")
    mpl.use("Agg")
    plt = require("matplotlib.pyplot", "vzedge eval --plot")
    rows = result["rows"]
    full = rows[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    styles = dict(zip(METHODS, ("o-", "v-", "P-", "s--", "^:", "X-", "x--"), strict=True))
    styles[TUNED_METHOD] = "D-."
    colours = {}
    for method, style in styles.items():
        pts = sorted(
            (r["tokens"], r["accuracy"]["overall"], r.get("ci_low"), r.get("ci_high"))
            for r in rows
            if r["method"] == method
        )
        if pts:
            xs, ys = [p[0] for p in pts], [100 * p[1] for p in pts]
            label = method + (" (text-conditioned)" if method in TEXT_METHODS else "")
            (line,) = ax.plot(xs, ys, style, label=label)
            colours[method] = line.get_color()
            if all(p[2] is not None for p in pts):
                ax.fill_between(
                    xs, [100 * p[2] for p in pts], [100 * p[3] for p in pts], color=line.get_color(), alpha=0.12
                )
    for r in rows:  # adaptive rows: one point at their mean token count, with its interval
        if r["method"].endswith(ADAPTIVE_SUFFIX):
            base = r["method"][: -len(ADAPTIVE_SUFFIX)]
            y = 100 * r["accuracy"]["overall"]
            ax.errorbar(
                [r["tokens"]],
                [y],
                yerr=[[y - 100 * r["ci_low"]], [100 * r["ci_high"] - y]],
                fmt="*",
                ms=11,
                color=colours.get(base),
                label=r["method"],
            )
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
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
