"""The CLI verbs of the core: info, show, generate, and their bad-input exit status."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from vzedge.cli import EXIT_BAD_INPUT, run


def test_help_lists_the_verbs():
    exe = shutil.which("vzedge")
    cmd = [exe] if exe else [sys.executable, "-m", "vzedge"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=True).stdout
    for verb in ("info", "show", "generate"):
        assert verb in out


def test_info_json_has_token_counts_and_flops(capsys):
    assert run(["info", "--model", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # The trained tiny: 224 px / patch 14 = 16 x 16 patches + CLS.
    assert report["visual_tokens"] == {"stock": 256, "visionzip": 64, "dominant": 54, "contextual": 10}
    assert report["encoder"]["sequence_tokens"] == 257
    assert report["encoder"]["layers_computed_with_visionzip"] == 3
    # T(4nd^2 + 2n^2d + 2ndm) with the tiny LLM: T=4, d=128, m=384.
    t, d, m = 4, 128, 384
    for key, n in (("stock", 256), ("visionzip", 64)):
        expect = t * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
        assert report["llm_prefill_flops_visual"][key] == pytest.approx(expect, rel=1e-12)


def test_info_text(capsys):
    assert run(["info"]) == 0
    out = capsys.readouterr().out
    assert "stock 256 -> VisionZip 64" in out


def test_show_writes_a_png(tmp_path, capsys):
    out = tmp_path / "kept.png"
    assert run(["show", "--model", "tiny", "--image", "demo", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width == 2 * 224 + 8
    assert "54 dominant + 10 contextual" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["kept.png"], "no temp files left behind"


def test_show_reads_an_image_file(tmp_path):
    src = tmp_path / "in.jpg"
    Image.new("RGB", (640, 480), (10, 200, 30)).save(src)
    assert run(["show", "--image", str(src), "--out", str(tmp_path / "o.png"), "--dominant", "20"]) == 0


def test_generate_on_visionzip_and_baseline(capsys):
    assert run(["generate", "--max-new-tokens", "2", "--json"]) == 0
    vz = json.loads(capsys.readouterr().out)
    assert run(["generate", "--max-new-tokens", "2", "--json", "--no-visionzip"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert vz["image_tokens"] == 64 and full["image_tokens"] == 256
    assert full["prompt_tokens"] - vz["prompt_tokens"] == 256 - 64


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "--dominant", "0"], "dominant must be >= 1"),
        (["info", "--dominant", "600", "--contextual", "0"], "exceeds the 257 tokens"),
        (["info", "--contextual", "-1"], "contextual=-1 is negative"),
        (["info", "--model", "no such model"], "neither a built-in model"),
        (["show", "--image", "/nonexistent.png", "--out", "/tmp/x.png"], "does not exist"),
        (["generate", "--layer", "7"], "layer=7 is out of range"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    assert run(argv) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert run(["show", "--image", str(bad), "--out", str(tmp_path / "o.png")]) == EXIT_BAD_INPUT
    assert "cannot read image" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
