"""The text-conditioned stage end to end on the built-in model: the eval row, the inputs_embeds answer path against
the stock one, and the runtime (chat, run, an exported stage 1) with the stage; refusals."""

from __future__ import annotations

import json

import pytest
import torch

from vzedge._deps import bitsandbytes_available
from vzedge.cli import EXIT_BAD_INPUT
from vzedge.cli import run as cli
from vzedge.eval.data import synth_items
from vzedge.eval.run import answer, answer_text_conditioned, stock_image_tokens
from vzedge.models.loading import load_model
from vzedge.models.textstage import embed_questions, image_cache_tokens, select_for_questions
from vzedge.runtime.api import chat, load_session, run
from vzedge.runtime.config import RunConfig
from vzedge.runtime.report import markdown
from vzedge.select import AdaptiveBudget
from vzedge.select.textcond import TextStage, text_relevance

FAST = dict(max_new_tokens=3, memory_interval_s=0.05)


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny")
    return loaded.vlm.eval(), loaded.processor


def test_keeping_every_token_answers_like_the_stock_model(tiny):
    """Stage 2 at k = all N tokens selects them all, in order: the inputs_embeds path must answer exactly as the
    model's own pixel path (the `full` row)."""
    vlm, proc = tiny
    items = synth_items(8, 0, vlm.config.vision_config.image_size, "small")
    n = stock_image_tokens(vlm)
    assert answer_text_conditioned(vlm, proc, items, n, 4, 6) == answer(vlm, proc, items, n, 4, 6)


def test_selection_follows_the_question(tiny):
    vlm, proc = tiny
    items = synth_items(3, 0, vlm.config.vision_config.image_size, "small")
    px = proc.image_processor(images=[it.image for it in items], return_tensors="pt")["pixel_values"]
    cached = image_cache_tokens(vlm, px)
    assert cached.shape == (3, 256, vlm.config.text_config.hidden_size)
    text, mask = embed_questions(vlm, proc.tokenizer, [it.question for it in items])
    assert text.shape[:2] == mask.shape and bool(mask[:, 0].all())
    rel = text_relevance(cached, text, mask)
    assert torch.allclose(rel.amin(1), torch.zeros(3)) and torch.allclose(rel.amax(1), torch.ones(3))
    _, kept_a = select_for_questions(vlm, proc.tokenizer, cached, [it.question for it in items], TextStage(14))
    _, kept_b = select_for_questions(vlm, proc.tokenizer, cached, ["What is written in the corner?"] * 3, TextStage(14))
    assert kept_a.shape == (3, 14) and torch.all(kept_a[:, 1:] > kept_a[:, :-1])
    assert not torch.equal(kept_a, kept_b)  # another question, another subset of the same cached image
    with pytest.raises(ValueError, match="non-empty question"):
        select_for_questions(vlm, proc.tokenizer, cached, ["", "a", "b"], TextStage(14))


def test_eval_row_is_labelled_with_intervals(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["eval", "--model", "tiny", "--data", "synth-small", "--tokens", "64", "--n", "6"]
    assert cli([*argv, "--methods", "random,cdpruner,dpp", "--batch-size", "6", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| cdpruner (text-conditioned) | 64 | 28 |" in printed and "| dpp | 64 | 28 |" in printed
    res = json.loads(out.read_text())
    rows = {r["method"]: r for r in res["rows"]}
    row = rows["cdpruner"]
    assert row["text_conditioned"] is True and rows["random"]["text_conditioned"] is False
    assert row["tokens"] == 28 and 0 <= row["ci_low"] <= row["accuracy"]["overall"] <= row["ci_high"] <= 1
    assert set(row["ci_per_kind"]) == {"colour", "shape", "word"}
    assert row["vs_random"]["a_only"] + row["vs_random"]["b_only"] <= 6
    assert set(row["vs_same_tokens"]) == {"random", "dpp"} and rows["dpp"]["text_conditioned"] is False
    assert res["text_conditioned"]["methods"] == {"cdpruner": True, "dpp": False}
    assert res["text_conditioned"]["text_conditioned"] is True and "question" in res["text_conditioned"]["relevance"]


@pytest.fixture(scope="module")
def session():
    return load_session(RunConfig(model="tiny", visionzip=None, text_stage=14, **FAST))


def test_chat_encodes_once_and_selects_per_question(session, monkeypatch):
    calls = []
    encode = session.vision.encode_prepared
    monkeypatch.setattr(session.vision, "encode_prepared", lambda p: calls.append(1) or encode(p))
    cfg = RunConfig(model="tiny", visionzip=None, text_stage=14, source="demo", **FAST)
    result = chat(cfg, ["What colour is the circle?", "What is written in the corner?"], session)
    assert calls == [1]  # the image's 256 tokens once, for both questions
    assert result["image_tokens"] == 14 and result["selection"]["text_conditioned"] is True
    assert result["selection"]["stage1"]["tokens"] == 256 and result["selection"]["stage2"]["tokens"] == 14
    prefix = len(session.llm._ids(session.llm.prefix_text, bos=True)[0])
    for turn in result["turns"]:
        assert turn["answer"] and turn["text_stage_ms"] > 0 and turn["prefix_tokens"] == 14 + prefix


def test_run_loop_with_the_text_stage(session):
    cfg = RunConfig(model="tiny", visionzip=None, text_stage=14, source="synthetic:4", policy="all", **FAST)
    report = run(cfg, session)
    s = report["summary"]
    assert s["frames"]["processed"] == 4 and s["frames"]["pending"] == 0
    assert s["image_tokens_mean"] == 14 and s["stages_ms"]["text_stage"]["n"] == 4
    assert report["selection"]["text_conditioned"] and report["config"]["text_conditioned"]
    assert "text-conditioned" in markdown(report)


def test_exported_stage1_feeds_the_text_stage(tmp_path):
    """An exported graph (with its projector) is a stage 1 too: its K1 tokens, then K of them per question; the
    selection equals the one on PyTorch's K1 tokens."""
    from vzedge.export import ExportConfig, export_vision

    out = tmp_path / "x"
    export_vision(ExportConfig(model="tiny-random", out=out, projector=True, max_batch=2))
    base = dict(model="tiny-random", text_stage=8, source="demo", **FAST)
    ort_s = load_session(RunConfig(**base, vision=str(out), vision_backend="ort-cpu"))
    torch_s = load_session(RunConfig(**base))
    assert ort_s.text_stage is not None and ort_s.text_stage.stage1_tokens == 64
    q = "What colour is the circle?"
    a = chat(RunConfig(**base, vision=str(out), vision_backend="ort-cpu"), [q], ort_s)
    b = chat(RunConfig(**base), [q], torch_s)
    assert a["selection"]["stage1"]["vision_backend"] == "ort-cpu" and a["image_tokens"] == 8
    assert a["turns"][0]["answer"] == b["turns"][0]["answer"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(text_stage=0), "positive token count"),
        (dict(text_stage=True), "positive token count"),
        (dict(text_stage=8, adaptive=AdaptiveBudget((14, 28))), "drop --adaptive or --text-stage"),
    ],
)
def test_bad_text_stage_config(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RunConfig(**kwargs)


def test_text_stage_must_keep_fewer_than_stage1(session):
    with pytest.raises(ValueError, match="--all-tokens"):
        load_session(RunConfig(model="tiny", text_stage=64, **FAST))  # stage 1: VisionZip's 64 tokens


def test_cli_refuses_text_stage_with_adaptive_and_remote(capsys):
    assert cli(["chat", "--all-tokens", "--text-stage", "0", "--question", "q"]) == EXIT_BAD_INPUT
    assert "positive token count" in capsys.readouterr().err
    assert cli(["run", "--text-stage", "8", "--adaptive", "14,28"]) == EXIT_BAD_INPUT
    assert "drop --adaptive or --text-stage" in capsys.readouterr().err
    assert cli(["run", "--text-stage", "8", "--remote", "http://127.0.0.1:9"]) == EXIT_BAD_INPUT
    assert "server has no text stage" in capsys.readouterr().err


@pytest.mark.skipif(not bitsandbytes_available(), reason="needs bitsandbytes (vzedge[bnb])")
def test_text_stage_with_a_quantized_llm():
    """nf4 LLM: the stage reads only the (unquantized) embedding table; stage 1 is the PyTorch encoder."""
    cfg = RunConfig(model="tiny-random", quant="nf4", visionzip=None, text_stage=8, source="demo", **FAST)
    session = load_session(cfg)
    result = chat(cfg, ["What colour is the circle?"], session)
    assert result["image_tokens"] == 8 and result["selection"]["text_conditioned"]
    assert result["turns"][0]["new_tokens"] >= 1 and result["turns"][0]["prefix_tokens"] > 8


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "sequential"])
def test_clip_of_frames_selects_per_frame(session, pipelined):
    base = dict(model="tiny", visionzip=None, text_stage=14, source="synthetic:4", policy="all", **FAST)
    report = run(RunConfig(**base, clip=2, pipelined=pipelined), session)
    assert report["summary"]["frames"]["processed"] == 4
    # The question of each clip saw 14 tokens of each of its 2 frames (recorded on the clip's first frame).
    assert [f["image_tokens"] for f in report["frames"]][::2] == [28, 28]
