"""The library itself (not only the CLI) refuses bad input before it writes anything: make-data's scene size,
tune's device, quantize's output folder (tests/test_awq.py covers that one with a real AWQ run)."""

from __future__ import annotations

import pytest
import torch

from vzedge.images import ImageLimits
from vzedge.tune import TuneConfig, make_data, tune


def test_make_data_checks_the_scene_size_itself(tmp_path):
    with pytest.raises(ValueError, match="--size 100000: each scene"):
        make_data(tmp_path / "d", n=2, size=100_000)
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="--size 64: each scene"):
        make_data(tmp_path / "d", n=2, size=64, limits=ImageLimits(max_pixels=64 * 64 - 1))
    assert not (tmp_path / "d").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of CUDA on a CPU-only machine")
def test_tune_refuses_a_bad_device_before_creating_its_folder(tmp_path):
    data = tmp_path / "data"
    make_data(data, n=2, size=64)
    out = tmp_path / "run"
    cfg = TuneConfig(model="tiny-random", data=str(data / "data.json"), images=str(data), out=str(out), device="cuda")
    with pytest.raises(ValueError, match="CUDA"):
        tune(cfg)
    assert not out.exists() and list(tmp_path.glob(".run*")) == []  # no folder, no lock file left
