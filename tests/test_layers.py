"""The layering in pyproject.toml's import-linter contracts holds, no import cycle exists, and a wrong import
fails the check with the contract's name (scripts/lint_imports.py, which CI runs)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = "Layers: cli > serve | vllm > export | runtime"  # the start of the layers contract's name
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("importlinter") is None or shutil.which("lint-imports") is None,
    reason="import-linter is not installed (pip install -e '.[dev]')",
)


def _script():
    spec = importlib.util.spec_from_file_location("lint_imports", ROOT / "scripts" / "lint_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tree_keeps_every_contract_and_has_no_cycle(tmp_path):
    lint = _script()
    staged = lint.stage(tmp_path)
    assert (staged / "vzedge" / "export" / "api.py").is_file()  # staged as the wheel lays it out
    assert (staged / "vzedge" / "runtime" / "backends" / "vision.py").is_file()
    result = lint.lint(staged)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    assert lint.cycles(staged) == []


@pytest.mark.parametrize(
    ("planted", "contract"),
    [
        # a model family reaching up into the CLI
        ({"vzedge/models/_wrong.py": "import vzedge.cli\n"}, LAYERS),
        # the runtime importing the exporter (an edge install has no exporter)
        ({"vzedge/runtime/_wrong.py": "from vzedge.export import api\n"}, LAYERS),
        # the runtime importing a training workflow
        ({"vzedge/runtime/_wrong.py": "import vzedge.tune\n"}, "The edge runtime needs neither"),
        # one workflow importing another
        ({"vzedge/eval/_wrong.py": "import vzedge.budget\n"}, LAYERS),
    ],
)
def test_wrong_import_breaks_a_named_contract(tmp_path, planted, contract):
    lint = _script()
    result = lint.lint(lint.stage(tmp_path, planted))
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken.replace("\n", "")
    assert "_wrong" in broken


def test_a_planted_cycle_is_found(tmp_path):
    lint = _script()
    staged = lint.stage(
        tmp_path,
        {
            "vzedge/eval/_a.py": "from vzedge.eval import _b\n",
            "vzedge/eval/_b.py": "def f():\n    from vzedge.eval import _a\n",
        },
    )
    assert lint.cycles(staged) == [["vzedge.eval._a", "vzedge.eval._b"]]
