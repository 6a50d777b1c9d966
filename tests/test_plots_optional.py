"""Every verb works without matplotlib (the `plot` extra): tune skips loss.png with one line saying how to get
it; `eval --plot` and `run --plot` are refused before any work, with the install hint, leaving nothing behind."""

from __future__ import annotations

import sys

import pytest

from vzedge.cli import EXIT_BAD_INPUT, run
from vzedge.tune import make_data


@pytest.fixture
def no_matplotlib(monkeypatch):
    # A None entry in sys.modules makes `import matplotlib` raise ImportError, as on a default install.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr("vzedge.tune.outputs.plotting_available", lambda: False)


def test_tune_without_matplotlib_writes_everything_but_the_plot(tmp_path, no_matplotlib, capsys):
    data = tmp_path / "data"
    make_data(data, n=4, split="train", seed=0, size=112)
    out = tmp_path / "run"
    argv = ["tune", "--model", "tiny-random", "--data", str(data / "data.json"), "--images", str(data)]
    assert run([*argv, "--out", str(out), "--max-steps", "1", "--batch", "2", "--lr", "1e-3"]) == 0
    printed = capsys.readouterr().out
    assert "loss.png skipped: matplotlib is not installed (pip install 'vzedge[plot]')" in printed
    assert (out / "projector.safetensors").is_file() and (out / "tune_config.json").is_file()
    assert not (out / "loss.png").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--model", "tiny", "--n", "6", "--tokens", "64"],
        ["run", "--model", "tiny-random", "--source", "synthetic:2", "--frames", "2"],
    ],
)
def test_plot_without_matplotlib_is_refused_before_the_run(tmp_path, no_matplotlib, capsys, argv):
    json_out = tmp_path / "r.json"
    json_flag = "--json"
    code = run([*argv, json_flag, str(json_out), "--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert "pip install 'vzedge[plot]'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written: refused before the run
