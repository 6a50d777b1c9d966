"""Exporter bad input: each a clear error before any expensive work, nothing half-written left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vzedge._deps import tensorrt_available
from vzedge.export import ExportConfig, export_vision
from vzedge.export.manifest import identity_diff
from vzedge.export.tensorrt import DEFAULT_WORKSPACE_MIB, TensorRTConfig, engine_key, ort_tensorrt_providers
from vzedge.manifest import SCHEMA, SCHEMA_VERSION, read_manifest, verify_files
from vzedge.visionzip import VisionZipConfig


def _fake_manifest(folder: Path, source: str = "someone/other-model") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(b"not really")
    data = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "source": {"source": source, "revision": None},
        "visionzip": VisionZipConfig().to_dict(),
        "projector": False,
        "graph": {"dtype": "fp32", "opset": 18},
        "files": {"model.onnx": {"sha256": "0" * 64, "bytes": 10}},
    }
    (folder / "manifest.json").write_text(json.dumps(data))


def test_config_validation():
    with pytest.raises(ValueError, match="opset 13 is too old: LayerNormalization"):
        ExportConfig(model="tiny-random", out="x", opset=13)
    with pytest.raises(ValueError, match="use --dtype fp32, fp16, int8 or int8-static"):
        ExportConfig(model="tiny-random", out="x", dtype="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--max-batch"):
        ExportConfig(model="tiny-random", out="x", max_batch=0)
    with pytest.raises(ValueError, match="--model tiny"):
        ExportConfig(model=" ", out="x")
    with pytest.raises(TypeError, match="VisionZipConfig"):
        ExportConfig(model="tiny-random", out="x", visionzip={"dominant": 54})  # type: ignore[arg-type]
    assert ExportConfig(model="tiny-random", out="x", max_batch=1).parity_batch == 1


def test_unknown_model(tmp_path):
    with pytest.raises(ValueError, match="neither a built-in model"):
        export_vision(ExportConfig(model="no such model", out=tmp_path / "o"))
    assert list(tmp_path.iterdir()) == []


def test_token_counts_that_do_not_fit(tmp_path):
    cfg = ExportConfig(model="tiny-random", out=tmp_path / "o", visionzip=VisionZipConfig(dominant=570, contextual=10))
    with pytest.raises(ValueError, match="contextual=10 exceeds"):
        export_vision(cfg)
    assert list(tmp_path.iterdir()) == []


def test_projector_of_a_bare_encoder_is_refused(tmp_path):
    from transformers import CLIPVisionModel

    from vzedge.models.clip import tiny_config

    CLIPVisionModel(tiny_config()).save_pretrained(tmp_path / "enc")
    with pytest.raises(ValueError, match="drop --projector"):
        export_vision(ExportConfig(model=str(tmp_path / "enc"), out=tmp_path / "o", projector=True))
    assert not (tmp_path / "o").exists()


def test_folder_with_another_models_export_is_refused(tmp_path):
    out = tmp_path / "o"
    _fake_manifest(out)
    with pytest.raises(FileExistsError, match=r"different model or config.*--force"):
        export_vision(ExportConfig(model="tiny-random", out=out))
    assert (out / "model.onnx").read_bytes() == b"not really"  # untouched


def test_folder_without_manifest_is_a_half_written_export(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"partial")
    with pytest.raises(FileExistsError, match="no valid vzedge manifest"):
        export_vision(ExportConfig(model="tiny-random", out=out))


def test_leftover_partial_dir_is_reported(tmp_path):
    (tmp_path / ".o.abc123.partial").mkdir()
    with pytest.raises(FileExistsError, match=r"interrupted.*--force"):
        export_vision(ExportConfig(model="tiny-random", out=tmp_path / "o"))


def test_output_beside_a_file_is_not_writable(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="cannot write beside"):
        export_vision(ExportConfig(model="tiny-random", out=tmp_path / "afile" / "o"))


def test_read_only_output_folder(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="cannot write beside"):
            export_vision(ExportConfig(model="tiny-random", out=ro / "o"))
    finally:
        ro.chmod(0o755)


def test_cli_bad_input_exits_2(tmp_path, capsys):
    from vzedge.cli import run

    assert run(["export", "--model", "tiny-random", "--out", str(tmp_path / "o"), "--opset", "16"]) == 2
    assert "opset 16 is too old" in capsys.readouterr().err


def test_manifest_verification_catches_changes(tmp_path):
    from vzedge.export.manifest import write_manifest

    (tmp_path / "model.onnx").write_bytes(b"graph")
    m = write_manifest(tmp_path, {"source": {}, "graph": {"file": "model.onnx"}})
    verify_files(tmp_path, read_manifest(tmp_path))
    (tmp_path / "model.onnx").write_bytes(b"graph!")
    with pytest.raises(ValueError, match="does not match its sha256"):
        verify_files(tmp_path, m)
    (tmp_path / "extra.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="does not list"):
        verify_files(tmp_path, m)
    assert identity_diff({"model": "a"}, {"model": "b"}) == ["model: 'a' vs 'b'"]


# --- TensorRT: what can be checked without the library ------------------------------------------------------


def test_engine_key_depends_on_graph_version_gpu_and_profile(tmp_path):
    cfg = TensorRTConfig(
        onnx=tmp_path / "m.onnx", cache_dir=tmp_path, input_name="pixel_values", input_shape=(3, 336, 336), max_batch=8
    )
    base = engine_key("a" * 64, "10.3.0", "Orin", cfg)
    assert base == engine_key("a" * 64, "10.3.0", "Orin", cfg)
    assert (
        len(
            {
                base,
                engine_key("b" * 64, "10.3.0", "Orin", cfg),
                engine_key("a" * 64, "8.6.2", "Orin", cfg),
                engine_key("a" * 64, "10.3.0", "H100", cfg),
            }
        )
        == 4
    )
    assert cfg.profile() == {"min": [1, 3, 336, 336], "opt": [1, 3, 336, 336], "max": [8, 3, 336, 336]}
    assert cfg.workspace_mib == DEFAULT_WORKSPACE_MIB
    with pytest.raises(ValueError, match="min <= opt <= max"):
        TensorRTConfig(
            onnx=tmp_path, cache_dir=tmp_path, input_name="x", input_shape=(3, 2, 2), max_batch=2, opt_batch=4
        )


def test_ort_tensorrt_provider_options(tmp_path):
    providers = ort_tensorrt_providers(tmp_path, "pixel_values", (3, 336, 336), max_batch=8)
    name, opts = providers[0]
    assert name == "TensorrtExecutionProvider" and providers[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert opts["trt_profile_max_shapes"] == "pixel_values:8x3x336x336"
    assert opts["trt_engine_cache_enable"] and opts["trt_engine_cache_path"] == str(tmp_path)


@pytest.mark.skipif(tensorrt_available(), reason="tensorrt is installed")
def test_trt_without_tensorrt_names_the_extra(tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'vzedge\[trt\]'"):
        export_vision(ExportConfig(model="tiny-random", out=tmp_path / "o", trt=True))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not tensorrt_available(), reason="tensorrt is not installed")
@pytest.mark.gpu
def test_trt_engine_build(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    res = export_vision(ExportConfig(model="tiny-random", out=tmp_path / "o", dtype="fp16", trt=True, max_batch=4))
    trt = res.manifest["tensorrt"]
    assert (tmp_path / "o" / "tensorrt" / trt["engine"]).stat().st_size > 0
    assert trt["profile"]["max"][0] == 4
