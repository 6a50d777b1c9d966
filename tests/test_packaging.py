"""Packaging: the wheel holds every subpackage; `import vzedge` stays lean."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("onnxruntime", "tensorrt", "bitsandbytes", "gptqmodel", "onnx", "transformers")


def test_import_is_lean():
    code = (
        "import sys, json\n"
        "import vzedge, vzedge.export, vzedge.runtime\n"
        "from vzedge import VisionZipConfig, VisionZipEncoder, apply_visionzip\n"
        "import torch\n"
        f"print(json.dumps({{'loaded': [m for m in {HEAVY!r} if m in sys.modules],"
        " 'cuda_init': torch.cuda.is_initialized()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"loaded": [], "cuda_init": False}


@pytest.mark.parametrize("folder", ["export", "runtime"])
def test_bare_folder_import_is_refused(folder):
    proc = subprocess.run([sys.executable, "-c", f"import {folder}"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert f"import vzedge.{folder}" in proc.stderr


def _expected_packages() -> set[str]:
    pkgs = set()
    for top, name in (("vzedge", "vzedge"), ("export", "vzedge/export"), ("runtime", "vzedge/runtime")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            pkgs.add(str(Path(name) / rel) if str(rel) != "." else name)
    return pkgs


@pytest.mark.slow
def test_wheel_contains_every_subpackage(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("vzedge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packaged = {str(Path(n).parent) for n in names if n.endswith("__init__.py")}
    missing = _expected_packages() - packaged
    assert not missing, f"not in the wheel (add them to [tool.setuptools] packages): {sorted(missing)}"
    assert "vzedge/py.typed" in names
    # The built-in model and its tuned projector ship as package data (a fresh install runs the main job).
    for f in ("weights/tiny/model.safetensors", "weights/tiny/training.json", "weights/tiny/tokenizer.json"):
        assert f"vzedge/models/{f}" in names, f
    for f in ("projector.safetensors", "tune_config.json"):
        assert f"vzedge/models/weights/tiny-projector-54+10/{f}" in names, f
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)


def test_atomic_writes_get_default_permissions(tmp_path):
    import os

    from vzedge.io import atomic_dir, write_text

    mask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "out") as d:
            (d / "f.bin").write_bytes(b"1")
            os.chmod(d / "f.bin", 0o600)  # as mkstemp-made files inside would be
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "f.bin").stat().st_mode & 0o777 == 0o644
