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


def test_every_module_a_test_skips_without_is_installed_by_the_readme_test_command():
    """A test that skips for want of a module must not skip in CI: the README's test command installs it (the serve
    tests once skipped there because httpx came with no extra, and no green run showed it)."""
    import tomllib

    cmd = next(c for c in _readme_commands() if "python -m pytest" in c)
    extras = re.search(r'-e "\.\[([^\]]+)\]"', cmd)
    assert extras, cmd
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    installed = {
        re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")
        for extra in extras.group(1).split(",")
        for req in optional[extra.strip()]
    }
    skipped_on = {
        m.group(1).replace("_", "-")
        for path in (ROOT / "tests").glob("*.py")
        for m in re.finditer(r'importorskip\(\s*"([A-Za-z0-9_.]+)"', path.read_text(encoding="utf-8"))
    }
    assert skipped_on, "no importorskip found: the scan is broken"
    missing = sorted(m for m in skipped_on if m.split(".")[0] not in installed)
    assert not missing, f"tests skip without {missing}, which the README's test command does not install"
