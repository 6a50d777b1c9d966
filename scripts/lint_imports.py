"""Check vzedge's layering with import-linter (the contracts in pyproject.toml) and that no import cycle exists.

export/ and runtime/ install as vzedge.export and vzedge.runtime (pyproject's package-dir), so an editable
install does not show them inside vzedge's folder, where import-linter looks. This script stages the
package as the wheel lays it out (Python files only) in a temporary folder and runs `lint-imports` on it.

    python scripts/lint_imports.py            # exit 0: every contract kept, no cycle
    python scripts/lint_imports.py --cycles   # also list the import cycles (strongly connected modules)

Runs in CI (.ci/run). Needs import-linter (the dev extra).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each part of the vzedge package lives in the source tree (pyproject's package-dir).
LAYOUT = {"vzedge": ROOT / "vzedge", "vzedge/export": ROOT / "export", "vzedge/runtime": ROOT / "runtime"}


def stage(dest: Path, extra: dict[str, str] | None = None) -> Path:
    """Copy the package's Python files into dest/vzedge as the wheel lays them out; `extra` adds files
    (relative path -> source text), which tests use to plant a wrong import."""
    for rel, src in LAYOUT.items():
        shutil.copytree(src, dest / rel, ignore=_not_python, dirs_exist_ok=True)
    for rel, text in (extra or {}).items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text, encoding="utf-8")
    return dest


def _not_python(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if not n.endswith(".py") and not os.path.isdir(os.path.join(folder, n))]


def cycles(path: Path) -> list[list[str]]:
    """The import cycles among vzedge's modules (function-level imports included): each a list of modules."""
    # grimp reads the staged tree in a fresh process: in this one, `vzedge` may already be imported from
    # the checkout, and grimp would find that instead.
    code = (
        "import grimp, json\n"
        "g = grimp.build_graph('vzedge', cache_dir=None)\n"
        "print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(path))
    out = subprocess.run([sys.executable, "-c", code], cwd=path, env=env, capture_output=True, text=True, check=True)
    edges: dict[str, list[str]] = json.loads(out.stdout)
    modules = sorted(edges)
    # Tarjan's strongly connected components, iterative.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, []))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(path))
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    return subprocess.run(
        [exe, "--no-cache", str(ROOT / "pyproject.toml")],
        cwd=path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", action="store_true", help="list the import cycles even when there are none")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vzedge-lint-") as tmp:
        staged = stage(Path(tmp))
        result = lint(staged)
        print(result.stdout, end="")
        print(result.stderr, end="", file=sys.stderr)
        found = cycles(staged)
    for c in found:
        print("import cycle: " + " <-> ".join(c))
    if args.cycles or found:
        print(f"{len(found)} import cycle(s)")
    return 1 if result.returncode or found else 0


if __name__ == "__main__":
    sys.exit(main())
