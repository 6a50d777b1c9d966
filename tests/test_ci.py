"""CI runs the README's commands as written: the Quick start's main job and its test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    """The one-line commands of the README's Quick start section, in its ```bash blocks."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Quick start.*?(?=^## )", text, flags=re.S | re.M)
    assert section, "README.md has no '## Quick start' section"
    blocks = re.findall(r"```bash\n(.*?)```", section.group(0), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_quick_start_has_the_main_job_and_the_test_command():
    cmds = _readme_commands()
    assert any("vzedge generate" in c for c in cmds), cmds
    assert any("python -m pytest" in c for c in cmds), cmds
    assert all(c.startswith("pip install -c constraints.txt") for c in cmds), cmds


def test_ci_runs_every_quick_start_command_as_written_in_a_fresh_venv():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    lines = [line.strip() for line in ci.splitlines()]
    for cmd in _readme_commands():
        # The command is a line of .ci/run on its own (possibly piped into tee), not a paraphrase of it.
        assert any(line == cmd or line.startswith(cmd + " | tee ") for line in lines), f".ci/run lacks: {cmd}"
    # Fresh virtual environments in a temp folder, every run, and removed afterwards.
    assert re.search(r"mktemp -d", ci) and "trap 'rm -rf" in ci
    assert ci.count("-m venv") >= 2
    assert "--system-site-packages" not in ci


def test_ci_checks_the_main_jobs_answer():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'grep -qx "answer: blue"' in ci
