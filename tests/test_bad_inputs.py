"""Bad and hostile input, class by class (issue 13): each case asserts the exit status, one line on stderr that
names the fix, no traceback, and nothing left behind. Class 1 also bounds the peak RSS of the refusing process.

Most cases run the CLI in-process (`vzedge.cli.run`); signals, locks held by another process and peak memory
need a child process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vzedge._deps import onnxruntime_available
from vzedge.cli import EXIT_BAD_INPUT, EXIT_SIGINT, EXIT_SIGTERM, run
from vzedge.io import sha256_file

ROOT = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = run(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return rc, out, err


def assert_one_line_error(rc: int, err: str, verb: str, pattern: str) -> None:
    import re

    assert rc == EXIT_BAD_INPUT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"vzedge {verb}: error: "), lines[0]
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares width x height (its pixel data is a single row: never decoded)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    Image.new("RGB", (1, 20000), (255, 0, 0)).save(d / "tall.png")  # ~150 bytes, 20000:1
    _png_declaring(d / "huge.png", 16000, 16000)
    f = np.full((16, 16), 0.5, np.float32)
    f[3, 3] = np.nan
    Image.fromarray(f, mode="F").save(d / "nan.tif")
    (d / "not-an-image.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return {p.stem: p for p in d.iterdir()}


# --- class 1: resource exhaustion from small inputs -------------------------------------------------------
CLASS1 = [
    (["generate", "--image", "{tall}"], "generate", r"aspect ratio 20,000\.0:1.*--max-aspect-ratio"),
    (["show", "--image", "{tall}", "--out", "{tmp}/o.png"], "show", r"--max-aspect-ratio"),
    (["generate", "--image", "{huge}"], "generate", r"256,000,000 pixels.*--max-image-pixels"),
    (["generate", "--prompt", "x" * 108_000], "generate", r"over the model's context of 2,048 tokens.*shorten"),
    (["generate", "--max-new-tokens", "4000"], "generate", r"context of 2,048.*--max-new-tokens"),
    (["make-data", "--out", "{tmp}/d", "--size", "100000"], "make-data", r"--max-image-pixels"),
    (["run", "--source", "{tall}", "--frames", "1"], "run", r"--max-aspect-ratio"),
    (["chat", "--source", "{huge}", "--question", "q"], "chat", r"--max-image-pixels"),
    (["generate", "--max-image-pixels", "0"], "generate", r"--max-image-pixels 0"),
    (["generate", "--max-aspect-ratio", "inf"], "generate", r"--max-aspect-ratio inf"),
]


@pytest.mark.parametrize(("argv", "verb", "pattern"), CLASS1, ids=[" ".join(c[0])[:40] for c in CLASS1])
def test_class1_limits_are_checked_up_front(argv, verb, pattern, images, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, **images) for a in argv]
    rc, _, err = cli(argv, capsys)
    assert_one_line_error(rc, err, verb, pattern)
    assert _tree(tmp_path) == set()


def test_class1_the_limit_can_be_raised(tmp_path, capsys):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (100, 1), (0, 0, 255)).save(wide)  # 100:1
    rc, _, err = cli(["generate", "--image", str(wide), "--max-new-tokens", "1"], capsys)
    assert_one_line_error(rc, err, "generate", r"100\.0:1, over the limit of 20:1")
    rc, out, _ = cli(["generate", "--image", str(wide), "--max-new-tokens", "1", "--max-aspect-ratio", "100"], capsys)
    assert rc == 0 and "answer:" in out


@pytest.mark.parametrize("image", ["tall", "huge"])
def test_class1_peak_rss_is_bounded(image, images, tmp_path):
    """The refusing process stays near an idle CLI's footprint (the 1x20000 PNG took 10.2 GB before)."""
    code = (
        "import sys\n"
        "from vzedge.cli import run\n"
        f"rc = run(['generate', '--image', {str(images[image])!r}])\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent (here, pytest).
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    peak_mib = int(proc.stdout.strip().splitlines()[-1]) / 1024  # VmHWM is in kB
    assert peak_mib < 1500, f"peak RSS {peak_mib:.0f} MiB"


# --- class 2: export artefacts that can be made to lie ------------------------------------------------------
needs_ort = pytest.mark.skipif(not onnxruntime_available(), reason="needs onnxruntime (vzedge[export])")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    if not onnxruntime_available():
        pytest.skip("needs onnxruntime (vzedge[export])")
    from vzedge.export import ExportConfig, export_vision

    out = tmp_path_factory.mktemp("exp") / "tiny"
    export_vision(ExportConfig(model="tiny", out=out, projector=True, max_batch=2))
    return out


def _rehash(folder: Path, manifest: dict) -> None:
    for rel in list(manifest["files"]):
        p = folder / rel
        if p.is_file():
            manifest["files"][rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}


def _tamper_files_outside(folder: Path, m: dict) -> None:
    other = folder.parent / "other"
    other.mkdir(exist_ok=True)
    shutil.copy(folder / "model.onnx", other / "model.onnx")
    m["files"]["../other/model.onnx"] = {"sha256": sha256_file(other / "model.onnx")}
    m["graph"]["file"] = "../other/model.onnx"


def _tamper_graph_absolute(folder: Path, m: dict) -> None:
    m["graph"]["file"] = str((folder / "model.onnx").resolve())


def _tamper_graph_unhashed(folder: Path, m: dict) -> None:
    # A second graph, hashed, plus graph.file pointing at a name files[] does not list.
    m["graph"]["file"] = "model2.onnx"


def _tamper_token_count(folder: Path, m: dict) -> None:
    m["visionzip"]["dominant"] = 40  # 50 tokens claimed, the graph emits 64
    m["graph"]["outputs"][0]["shape"][1] = 50


def _tamper_std_zero(folder: Path, m: dict) -> None:
    m["preprocess"]["std"] = [0, 0, 0]


def _tamper_not_protobuf(folder: Path, m: dict) -> None:
    (folder / "model.onnx").write_bytes(b"this is not a protobuf")
    _rehash(folder, m)


CLASS2 = [
    (_tamper_files_outside, r"outside the export folder"),
    (_tamper_graph_absolute, r"outside the export folder"),
    (_tamper_graph_unhashed, r"model2\.onnx.*not among the hashed files"),
    (_tamper_token_count, r"do not match|does not describe this graph"),
    (_tamper_std_zero, r"std .* has a zero"),
    (_tamper_not_protobuf, r"not a graph ONNX Runtime can load.*re-export"),
]


@needs_ort
@pytest.mark.parametrize(("tamper", "pattern"), CLASS2, ids=[c[0].__name__ for c in CLASS2])
def test_class2_a_manifest_that_lies_is_refused(tamper, pattern, export_dir, tmp_path, capsys):
    folder = tmp_path / "exp"
    shutil.copytree(export_dir, folder)
    m = json.loads((folder / "manifest.json").read_text())
    tamper(folder, m)
    (folder / "manifest.json").write_text(json.dumps(m))
    before = _tree(tmp_path)
    rc, _, err = cli(
        ["run", "--vision", str(folder), "--vision-backend", "ort-cpu", "--frames", "1", "--max-new-tokens", "1"],
        capsys,
    )
    assert_one_line_error(rc, err, "run", pattern)
    assert _tree(tmp_path) == before


@needs_ort
def test_class2_the_untampered_export_runs(export_dir, capsys):
    rc, out, _ = cli(
        ["run", "--vision", str(export_dir), "--vision-backend", "ort-cpu", "--frames", "1", "--max-new-tokens", "1"],
        capsys,
    )
    assert rc == 0 and "64 image tokens" in out


# --- class 3: --force and concurrency -------------------------------------------------------------------
def test_class3_force_never_deletes_a_users_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    rc, _, err = cli(["export", "--model", "tiny", "--out", str(out), "--force"], capsys)
    if not onnxruntime_available():
        assert_one_line_error(rc, err, "export", r"vzedge\[export\]")
    else:
        assert_one_line_error(rc, err, "export", r"not a vzedge export and --force will not delete it")
    assert (out / "thesis.tex").read_text() == "years of work"
    assert _tree(tmp_path) == {"mine", "mine/thesis.tex"}


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_class3_quantize_force_replaces_only_its_own_output(kind, tmp_path, capsys):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("a file")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    rc, _, err = cli(["quantize", "--method", "awq", "--out", str(out), "--force"], capsys)
    pattern = r"is a file; vzedge writes a folder" if kind == "file" else r"no vzedge_quant\.json.*--force will not"
    assert_one_line_error(rc, err, "quantize", pattern)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not [p for p in _tree(tmp_path) if p.startswith(".")]


def test_class3_atomic_dir_refuses_to_replace_a_file(tmp_path):
    from vzedge.io import atomic_dir

    target = tmp_path / "model"
    target.write_text("a file")
    with pytest.raises(FileExistsError, match="is a file, not a folder vzedge wrote"), atomic_dir(target, True):
        pass
    assert target.read_text() == "a file" and _tree(tmp_path) == {"model"}


def test_class3_an_output_being_written_is_locked(tmp_path, capsys):
    """A second writer fails at once naming the holder; the first one's temp folder is left alone."""
    target = tmp_path / "exp"
    partial = tmp_path / ".exp.abc.partial"
    partial.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time\nfrom vzedge.io import output_lock\nwith output_lock({str(target)!r}):\n"
            "    print('held', flush=True)\n    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, _, err = cli(["make-data", "--out", str(target), "--n", "2"], capsys)
        assert_one_line_error(rc, err, "make-data", rf"being written by another vzedge process \(pid {holder.pid}\)")
        if onnxruntime_available():
            rc, _, err = cli(["export", "--model", "tiny", "--out", str(target), "--force"], capsys)
            assert_one_line_error(rc, err, "export", r"being written by another vzedge process")
        assert partial.is_dir(), "the running writer's temp folder must survive"
    finally:
        holder.kill()
        holder.wait()
    # The lock dies with its process: the same output is writable again.
    rc, _, _ = cli(["make-data", "--out", str(target), "--n", "2"], capsys)
    assert rc == 0 and (target / "data.json").is_file()


# --- class 4: signals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sig", "code", "name"), [(signal.SIGTERM, EXIT_SIGTERM, "SIGTERM"), (signal.SIGINT, EXIT_SIGINT, "Ctrl-C")]
)
def test_class4_signal_during_make_data_cleans_up(sig, code, name, tmp_path):
    out = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vzedge", "make-data", "--out", str(out), "--n", "5000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".data.*.partial/images/*")):  # it is writing images
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert lines == [f"vzedge make-data: interrupted by {name}; stopped, and its temporary and partial files removed"]
    assert _tree(tmp_path) == set(), "no .partial folder, no lock file"


def test_class4_sigterm_during_tune_leaves_only_the_resumable_run(tmp_path, capsys):
    assert run(["make-data", "--out", str(tmp_path / "d"), "--n", "8"]) == 0
    capsys.readouterr()
    argv = ["tune", "--data", str(tmp_path / "d" / "data.json"), "--images", str(tmp_path / "d")]
    argv += ["--out", str(tmp_path / "t"), "--max-steps", "400", "--batch", "2", "--save-every", "1"]
    argv += ["--dominant", "24", "--contextual", "4"]
    proc = subprocess.Popen([sys.executable, "-m", "vzedge", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"step 1/400"), proc.communicate()  # it is training
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SIGTERM, err
    assert err.decode().strip().splitlines() == [
        "vzedge tune: interrupted by SIGTERM; stopped, and its temporary and partial files removed"
    ]
    hidden = [p for p in _tree(tmp_path) if any(part.startswith(".") for part in p.split("/"))]
    assert hidden == [], "no .partial, .tmp or lock files"
    assert (tmp_path / "t" / "run.json").is_file()  # what --resume continues from


def test_class4_sigterm_during_run_keeps_the_report(tmp_path):
    """The loop stops, accounts for every frame it read, writes its report and exits 143."""
    report = tmp_path / "report.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vzedge",
            "run",
            "--source",
            "synthetic:100000",
            "--max-new-tokens",
            "1",
            "--policy",
            "all",
            "--json",
            str(report),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(20)  # model loaded, frames flowing
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SIGTERM, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("vzedge run: interrupted; the report covers the ")
    data = json.loads(report.read_text())
    f = data["summary"]["frames"]
    assert data["interrupted"] is True and f["pending"] == 0
    assert f["seen"] == f["processed"] + f["dropped"] + f["failed"] > 0


# --- class 5: tracebacks where a message belongs -------------------------------------------------------------
def _corrupt_weights(tmp: Path) -> str:
    from vzedge.models.tiny import weights_dir

    folder = tmp / "w"
    shutil.copytree(weights_dir(), folder)
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    return str(folder)


CLASS5 = [
    (["run", "--device", "cuda", "--frames", "1"], "run", r"--device cuda: this torch .* use --device cpu"),
    (["run", "--device", "cuda:abc", "--frames", "1"], "run", r"--device 'cuda:abc': use auto, cpu, cuda or cuda:N"),
    (["budget", "--headroom", "inf"], "budget", r"--headroom inf: pass the GiB"),
    (["budget", "--headroom", "nan"], "budget", r"--headroom nan: pass the GiB"),
    (["show", "--out", "{tmp}"], "show", r"--out .* is a folder; pass a file path"),
    (["run", "--frames", "1", "--json", "{tmp}"], "run", r"--json .* is a folder"),
    (["run", "--frames", "1", "--json", "/proc/vzedge-report.json"], "run", r"--json .*cannot write"),
    (["generate", "--model", "{weights}"], "generate", r"truncated or corrupt.*save the model again"),
    (["generate", "--image", "{not-an-image}"], "generate", r"cannot read image"),
    (["run", "--source", "camera:abc"], "run", r"camera:K"),
]


@pytest.mark.parametrize(("argv", "verb", "pattern"), CLASS5, ids=[" ".join(c[0])[:40] for c in CLASS5])
def test_class5_messages_not_tracebacks(argv, verb, pattern, images, tmp_path, capsys):
    if "cuda" in " ".join(argv):
        import torch

        if torch.cuda.is_available() and argv[2] == "cuda":
            pytest.skip("this machine has CUDA: --device cuda is valid here")
    work = tmp_path / "work"
    work.mkdir()
    weights = _corrupt_weights(tmp_path) if "{weights}" in argv else ""
    argv = [a.format(tmp=work, weights=weights, **images) for a in argv]
    rc, _, err = cli(argv, capsys)
    assert_one_line_error(rc, err, verb, pattern)
    assert _tree(work) == set()


def test_class5_a_bug_keeps_its_traceback(monkeypatch):
    """The catch-all only takes errors vzedge raised on purpose; an internal TypeError propagates."""
    import vzedge.api

    def broken(*a, **k):
        return None + 1  # a bug, not bad input

    monkeypatch.setattr(vzedge.api, "info", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        run(["info"])


# --- class 6: silently wrong ---------------------------------------------------------------------------------
def test_class6_16bit_and_float_images_are_scaled_not_clipped(tmp_path):
    from vzedge.images import load_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    x = np.asarray(load_image(str(tmp_path / "g16.png")), dtype=np.float64)
    assert x.min() == 0 and x.max() == 255
    assert abs(x.mean() - 127.5) < 0.6  # clipped, it was 254.x (everything above 255 white)
    Image.fromarray(np.full((8, 8), 0.25, np.float32), mode="F").save(tmp_path / "f.tif")
    assert np.asarray(load_image(str(tmp_path / "f.tif")))[0, 0].tolist() == [64, 64, 64]  # round(0.25 * 255)


CLASS6 = [
    (["info", "--layer", "99"], "info", r"layer=99 is out of range for a 4-layer encoder"),
    (["generate", "--layer", "99"], "generate", r"layer=99 is out of range for a 4-layer encoder"),
    (["generate", "--image", "{nan}"], "generate", r"NaN or infinite pixels"),
    (["generate", "--model", "mymodels/llava7b"], "generate", r"no local folder 'mymodels/llava7b'"),
]


@pytest.mark.parametrize(("argv", "verb", "pattern"), CLASS6, ids=[" ".join(c[0])[:40] for c in CLASS6])
def test_class6_refused_not_silently_wrong(argv, verb, pattern, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the typo case must fail fast without a network
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    rc, _, err = cli([a.format(**images) for a in argv], capsys)
    assert_one_line_error(rc, err, verb, pattern)
    assert time.monotonic() - t0 < 60
    assert _tree(tmp_path) == set()


def test_class6_on_error_continue_survives_an_unreadable_image(images, tmp_path, capsys):
    src = tmp_path / "frames"
    src.mkdir()
    from vzedge.images import demo_image

    demo_image(224, 1).save(src / "a.png")
    shutil.copy(images["not-an-image"], src / "b.png")
    demo_image(224, 2).save(src / "c.png")
    report = tmp_path / "report.json"
    rc, _, _ = cli(
        [
            "run",
            "--source",
            str(src),
            "--policy",
            "all",
            "--on-error",
            "continue",
            "--max-new-tokens",
            "1",
            "--json",
            str(report),
        ],
        capsys,
    )
    assert rc == 0
    frames = json.loads(report.read_text())["summary"]["frames"]
    assert (frames["seen"], frames["processed"], frames["failed"], frames["pending"]) == (3, 2, 1, 0)


def test_class6_bench_uses_its_source(images, tmp_path, capsys):
    src = tmp_path / "frames"
    src.mkdir()
    from vzedge.images import demo_image

    for i in range(2):
        demo_image(224, i).save(src / f"{i}.png")
    out = tmp_path / "bench.json"
    rc, _, _ = cli(
        ["bench", "--source", str(src), "--frames", "2", "--max-new-tokens", "1", "--json", str(out)], capsys
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["source"] == str(src)
    assert result["sequential"]["config"]["source"] == str(src)


def test_class6_generate_json_is_clean_json_with_the_real_quant(capsys):
    rc, out, _ = cli(["generate", "--max-new-tokens", "1", "--json"], capsys)
    assert rc == 0
    result = json.loads(out)  # nothing but the JSON on stdout
    assert result["quant"] == "none"


def test_no_third_party_noise_on_a_normal_run():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    proc = subprocess.run(
        [sys.executable, "-m", "vzedge", "run", "--frames", "1", "--max-new-tokens", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
