"""Runtime: frame accounting under both policies, KV reuse vs recomputation, reports, failures, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vzedge._deps import bitsandbytes_available
from vzedge.images import demo_image
from vzedge.runtime.api import chat, load_session, run
from vzedge.runtime.config import RunConfig
from vzedge.runtime.report import markdown
from vzedge.runtime.sources import Frame, Source, open_source

FAST = dict(max_new_tokens=3, memory_interval_s=0.05)


@pytest.fixture(scope="module")
def session():
    # Random-weight tiny built from the seed: runtime behaviour does not depend on the weights.
    return load_session(RunConfig(model="tiny-random", **FAST))


def _accounted(report, expected_frames):
    f = report["summary"]["frames"]
    assert f["seen"] == expected_frames
    assert f["pending"] == 0, "every frame is processed, dropped or failed"
    assert f["processed"] + f["dropped"] + f["failed"] == expected_frames
    return f


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "sequential"])
@pytest.mark.parametrize("policy", ["latest", "all"])
def test_synthetic_source_every_frame_accounted(session, policy, pipelined):
    report = run(RunConfig(source="synthetic:10", policy=policy, pipelined=pipelined, **FAST), session)
    f = _accounted(report, 10)
    if policy == "all" or not pipelined:
        assert f["processed"] == 10 and f["dropped"] == 0
    else:
        assert f["processed"] >= 1
        assert sum(f["dropped_by_stage"].values()) == f["dropped"]
        assert set(f["dropped_by_stage"]) <= {"queue:vision", "queue:llm"}


def test_folder_and_image_sources(session, tmp_path):
    for i in range(4):
        demo_image(seed=i).save(tmp_path / f"f{i}.png")
    report = run(RunConfig(source=str(tmp_path), policy="all", **FAST), session)
    assert _accounted(report, 4)["processed"] == 4
    report = run(RunConfig(source=str(tmp_path / "f0.png"), frames=3, policy="all", **FAST), session)
    f = _accounted(report, 3)
    assert f["processed"] == 3
    # The same image three times: vision runs once, the token cache serves the rest.
    assert report["summary"]["cache_hits"] == 2


def test_report_fields_are_consistent(session):
    report = run(RunConfig(source="synthetic:6", policy="all", **FAST), session)
    stages = report["summary"]["stages_ms"]
    for name in ("capture", "preprocess", "vision", "prefill", "ttft", "decode_per_token", "end_to_end"):
        st = stages[name]
        assert st["n"] == 6
        assert st["min"] <= st["p50"] <= st["p90"] <= st["p99"], (name, st)
    for rec in report["frames"]:
        ms = rec["stage_ms"]
        llm = ms["ttft"] + ms["decode_per_token"] * max(0, rec["new_tokens"] - 1)
        parts = ms["capture"] + ms["preprocess"] + ms["vision"] + llm
        assert parts <= ms["end_to_end"] + 1.0, (rec["index"], parts, ms["end_to_end"])
        assert ms["prefill"] <= ms["ttft"] + 1e-6
    assert report["summary"]["memory"]["host_rss_peak"] > 0
    assert json.loads(json.dumps(report))["summary"]["frames"]["processed"] == 6
    table = markdown(report)
    assert "| vision |" in table and "0 unaccounted" in table


def test_multi_turn_reuse_matches_recomputing(session):
    """Logits after [prefix + image] reused across questions equal a fresh full forward."""
    llm, vision = session.llm, session.vision
    vlm, processor = session.loaded.vlm, session.loaded.processor
    image = demo_image(seed=3)
    pixels = vision.preprocess.batch([image])
    tokens = vision.encode(pixels)
    prefix = llm.prefill_image(tokens)
    questions = ["What colour is the circle?", "How many shapes?", "Is the square left of the circle?"]
    reused = [llm.answer(prefix, q, 2).first_logits for q in questions]
    assert prefix.cache.get_seq_length() == prefix.length, "the prefix cache is rolled back after each answer"
    from vzedge.models.llava import apply_visionzip, remove_visionzip

    apply_visionzip(vlm, session.cfg.visionzip, processor)
    try:
        for q, got in zip(questions, reused, strict=True):
            inputs = processor(images=image, text=f"USER: <image>\n{q} ASSISTANT:", return_tensors="pt")
            with torch.no_grad():
                full = vlm(**inputs).logits[0, -1].float()
            torch.testing.assert_close(got, full, atol=1e-4, rtol=0)
    finally:
        remove_visionzip(vlm, processor)


def test_chat_computes_the_image_once(session):
    result = chat(RunConfig(source="demo", **FAST), ["What shape is red?", "How many shapes?"], session)
    assert result["image_tokens"] == 64
    assert len(result["turns"]) == 2
    assert result["prefix_tokens"] == 64 + len(session.llm._ids(session.llm.prefix_text, bos=True)[0])


class _Boom(Source):
    length = 5

    def __iter__(self):
        for i in range(5):
            yield Frame(i, demo_image(seed=i), 0.0, 0.0)


def test_a_failing_stage_is_counted(session, monkeypatch):
    from vzedge.runtime import api

    calls = {"n": 0}
    real = session.vision.encode

    def flaky(pixels):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated vision failure")
        return real(pixels)

    monkeypatch.setattr(session.vision, "encode", flaky)
    monkeypatch.setattr(api, "open_source", lambda *a, **k: _Boom())
    report = run(RunConfig(policy="all", on_error="continue", token_cache=0, **FAST), session)
    f = _accounted(report, 5)
    assert f["failed"] == 1 and f["processed"] == 4
    assert "simulated vision failure" in report["summary"]["errors"][0]["error"]
    calls["n"] = 0
    report = run(RunConfig(policy="all", on_error="stop", token_cache=0, **FAST), session)
    f = _accounted(report, 5)
    assert f["failed"] == 1 and "simulated vision failure" in report["stopped_by_error"]


def test_ctrl_c_keeps_the_count(session, monkeypatch):
    from vzedge.runtime import api

    class Interrupted(Source):
        length = None

        def __iter__(self):
            for i in range(3):
                yield Frame(i, demo_image(seed=i), 0.0, 0.0)
            raise KeyboardInterrupt

    monkeypatch.setattr(api, "open_source", lambda *a, **k: Interrupted())
    for pipelined in (True, False):
        report = run(RunConfig(policy="all", pipelined=pipelined, **FAST), session)
        assert report["interrupted"] is True
        _accounted(report, 3)


_SOAK = """
import gc, json
from vzedge.runtime.api import load_session, run
from vzedge.runtime.config import RunConfig
from vzedge.runtime.metrics import host_rss_bytes, trim_heap

cfg = RunConfig(model="tiny-random", source="synthetic:150", policy="all", max_new_tokens=1, token_cache=4,
                memory_interval_s=0.1)
# glibc keeps freed heap pages mapped; hand them back before each reading, or one arena's growth
# (measured +/-12 MiB between identical 150-frame runs) swamps the per-frame figure.
session = load_session(cfg)
run(RunConfig(**{**cfg.__dict__, "source": "synthetic:30"}), session)
gc.collect(); trim_heap()
objects, rss, frames = [len(gc.get_objects())], [host_rss_bytes()], []
for _ in range(3):  # three rounds: a leak grows every round, a one-off allocation once
    report = run(cfg, session)
    frames.append(report["summary"]["frames"])
    del report
    gc.collect(); trim_heap()
    objects.append(len(gc.get_objects())); rss.append(host_rss_bytes())
print(json.dumps({"frames": frames, "objects": objects, "rss": rss}))
"""


def test_soak_memory_is_flat_and_nothing_is_lost():
    """A short soak (the 2,000-frame one is scripts/soak_runtime.py): nothing is retained per frame.

    In a fresh process (the test process's own heap history would swamp the figure), after a warm-up run,
    three rounds of 150 more frames may leave neither Python objects (gc count) nor host memory behind: a
    leaked KV prefix of tiny is ~145 KB per frame (21 MB over 150 frames), well over the 64 KiB-per-frame RSS bound.
    """
    import itertools
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _SOAK], capture_output=True, text=True, check=True, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for f in result["frames"]:
        assert f["seen"] == f["processed"] == 150 and f["pending"] == 0, f
    objects, rss = result["objects"], result["rss"]
    assert all(b - a < 150 * 0.5 for a, b in itertools.pairwise(objects)), result
    # The median round: under load one round's RSS has grown by up to 10 MiB from allocator and thread-pool
    # growth alone (the others +-3 MiB), while a leak grows every round.
    growth = sorted(b - a for a, b in itertools.pairwise(rss))
    assert growth[1] < 150 * 64 * 1024, result


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(policy="newest"), "policy 'newest'"),
        (dict(quant="int3"), "quant 'int3'"),
        (dict(template="USER: {question}"), "needs an <image> placeholder"),
        (dict(frames=0), "frames must be >= 1"),
        (dict(vision_backend="cuda"), "vision backend 'cuda'"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**kwargs)


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        open_source(str(tmp_path / "nope.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        open_source(str(tmp_path / "empty"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        open_source(str(bad))
    with pytest.raises(ValueError, match=r"video .* does not exist"):
        open_source(str(tmp_path / "clip.mp4"))


def test_camera_that_is_not_there():
    try:
        import cv2  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"vzedge\[video\]"):
            open_source("camera:7")
        return
    with pytest.raises(ValueError, match="cannot open camera 7"):
        open_source("camera:7")


def test_export_folder_problems_are_refused(session, tmp_path):
    from vzedge.runtime.backends.vision import open_vision_backend

    with pytest.raises(ValueError, match=r"has no manifest\.json"):
        open_vision_backend(str(tmp_path), session.loaded, None)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        open_vision_backend(str(tmp_path), session.loaded, None)
    with pytest.raises(ValueError, match="needs an export folder"):
        open_vision_backend(None, session.loaded, None, backend="ort")


def test_preprocess_matches_the_model_processor(session):
    ip = session.loaded.image_processor
    for im in (demo_image(), Image.new("RGB", (640, 360), (30, 120, 200)), Image.new("RGB", (301, 500), (9, 9, 9))):
        expect = ip(images=im, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(session.vision.preprocess.batch([im]), expect, atol=1e-5, rtol=0)


@pytest.mark.skipif(not bitsandbytes_available(), reason="needs bitsandbytes (vzedge[bnb])")
def test_loop_with_a_quantized_llm():
    import bitsandbytes as bnb

    session = load_session(RunConfig(model="tiny-random", quant="nf4", **FAST))
    layers = [m for m in session.loaded.vlm.model.language_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 4 * 7, "every projection of the 4-layer LLM is 4-bit"
    report = run(RunConfig(source="synthetic:3", policy="all", quant="nf4", **FAST), session)
    assert _accounted(report, 3)["processed"] == 3
    assert report["quant"] == "bnb-nf4"


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "sequential"])
def test_clips_of_frames_per_question(session, pipelined, monkeypatch):
    """clip=4: each frame compressed alone, 4 x 64 tokens per question, a partial tail clip counted."""
    seen = []
    real = session.llm.prefill_image
    monkeypatch.setattr(session.llm, "prefill_image", lambda t, **kw: seen.append(t.detach().clone()) or real(t, **kw))
    report = run(RunConfig(source="synthetic:10", clip=4, policy="all", pipelined=pipelined, **FAST), session)
    f = _accounted(report, 10)
    assert f["processed"] == 8 and f["dropped_by_stage"] == {"incomplete_clip": 2}
    assert report["summary"]["stages_ms"]["vision"]["n"] == 2, "stage times are per clip"
    assert [t.shape[1] for t in seen] == [4 * 64, 4 * 64]
    from vzedge.images import demo_image as scene

    pixels = session.vision.preprocess.batch([scene(seed=i) for i in range(4)])
    alone = torch.cat([session.vision.encode(pixels[i : i + 1]) for i in range(4)], dim=1)
    torch.testing.assert_close(seen[0], alone, atol=1e-5, rtol=0)


def test_long_runs_keep_a_bounded_window_of_records():
    """Per-frame records beyond the window fold into totals: accounting stays whole, memory stays flat."""
    from vzedge.runtime.metrics import RunMetrics

    m = RunMetrics(max_records=50)
    for i in range(500):
        m.stage(i, "end_to_end", float(i % 7))
        if i % 10 == 3:
            m.dropped(i, "queue:vision")
        elif i % 10 == 5:
            m.failed(i, "llm", RuntimeError("x"))
        else:
            m.frame(i).new_tokens = 2
            m.processed(i)
    s = m.summary()
    assert len(m.frames) <= 50
    assert s["frames"] == {
        "seen": 500,
        "processed": 400,
        "dropped": 50,
        "failed": 50,
        "pending": 0,
        "dropped_by_stage": {"queue:vision": 50},
    }
    assert s["new_tokens"] == 800
    assert s["stats_window_frames"] == len(m.frames)


def test_deferred_prefix_runs_with_the_first_question_and_then_serves_like_an_eager_one():
    """defer=True: one forward for [prefix + image + question]; the first answer equals the eager prefix's (same
    greedy tokens, logits within float noise), later questions reuse the cropped cache, and a forward that fails
    leaves the prefix deferred (a fresh cache, its embeddings kept) so the next question still answers."""
    from vzedge.models.loading import load_model
    from vzedge.runtime.backends.llm import LLMBackend

    loaded = load_model("tiny")
    llm = LLMBackend(loaded.vlm, loaded.processor.tokenizer)
    torch.manual_seed(0)
    tokens = torch.randn(1, 28, llm.hidden_size) * 0.5
    eager = llm.prefill_image(tokens)
    deferred = llm.prefill_image(tokens, defer=True)
    assert deferred.pending is not None and deferred.cache.get_seq_length() == 0
    assert deferred.length == eager.length
    for question in ("What colour is the circle?", "What shape is it?", "What colour is the circle?"):
        a, b = llm.answer(eager, question, 6), llm.answer(deferred, question, 6)
        assert a.token_ids == b.token_ids, question
        torch.testing.assert_close(b.first_logits, a.first_logits, atol=1e-4, rtol=1e-4)
        assert deferred.pending is None and deferred.cache.get_seq_length() == eager.length
    streamed = llm.prefill_image(tokens, defer=True)
    assert list(llm.stream(streamed, " What colour is the circle? ASSISTANT:", 4)) == list(
        llm.stream(eager, " What colour is the circle? ASSISTANT:", 4)
    )
    assert streamed.pending is None and streamed.cache.get_seq_length() == eager.length

    broken = llm.prefill_image(tokens, defer=True)
    real_lm = llm.lm
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        raise RuntimeError("out of memory (simulated)")

    llm.lm = failing
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            llm.answer(broken, "What colour is the circle?", 4)
    finally:
        llm.lm = real_lm
    assert calls["n"] == 1 and broken.pending is not None and broken.cache.get_seq_length() == 0
    assert (
        llm.answer(broken, "What colour is the circle?", 6).token_ids
        == llm.answer(eager, "What colour is the circle?", 6).token_ids
    )
