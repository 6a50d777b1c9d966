"""The server's parts without a server: prompt builder, config and CLI checks, image cache, sampling, image
decoding. Fast; no HTTP."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import pytest
import torch

from vzedge.prompt import question_template, render, single_turn


class _NoTemplate:
    chat_template = None


def _msgs(first: str = "Q1?") -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
        {"role": "user", "content": [{"type": "text", "text": "Q2?"}]},
    ]


def test_prompt_builder_matches_the_tiny_chat_template():
    from vzedge.models.loading import load_model

    processor = load_model("tiny").processor
    assert processor.chat_template
    assert single_turn(processor, "What?") == "USER: <image>\nWhat? ASSISTANT:"
    # The LLaVA-1.5 fallback (no chat template) renders what the template does.
    assert render(_NoTemplate(), _msgs()) == render(processor, _msgs())
    assert render(processor, _msgs()) == "USER: <image>\nQ1? ASSISTANT: A1</s>USER: Q2? ASSISTANT:"
    assert question_template(processor) == "USER: <image>\n{question} ASSISTANT:"
    assert question_template(_NoTemplate()).format(question="a {b}") == "USER: <image>\na {b} ASSISTANT:"


def test_prompt_builder_refuses_unknown_roles_and_parts():
    with pytest.raises(ValueError, match="role 'robot'"):
        render(_NoTemplate(), [{"role": "robot", "content": []}])
    with pytest.raises(ValueError, match="type 'audio'"):
        render(_NoTemplate(), [{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(ValueError, match="at least one message"):
        render(_NoTemplate(), [])


def test_import_vzedge_serve_is_lean():
    code = (
        "import sys, json, vzedge.serve, vzedge.cli\n"
        "heavy = ('fastapi', 'uvicorn', 'prometheus_client', 'transformers')\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budget", "54"], "dominant+contextual"),
        (["--port", "0"], "port must be"),
        (["--image-root", "/nonexistent-dir"], "not a folder"),
        (["--max-queue", "0"], "max_queue"),
        (["--quant", "int3"], "quant 'int3'"),
        (["--no-visionzip", "--projector", "/some/dir"], "drop --no-visionzip"),
        (["--api-key", ""], "--api-key is empty"),
    ],
)
def test_cli_refuses_bad_options(argv, message, capsys):
    from vzedge.cli import run

    assert run(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_parse_budget():
    from vzedge.serve import parse_budget

    assert parse_budget("54+10") == (54, 10)
    assert parse_budget("24+0") == (24, 0)


def test_image_cache_is_lru_under_a_byte_cap():
    from vzedge.serve.cache import CacheEntry, ImageCache

    cache = ImageCache(300)
    for k in "abc":
        assert cache.put((k,), CacheEntry(torch.zeros(1), None, 100))
    assert cache.get(("a",)) is not None  # a is now the most recent
    cache.put(("d",), CacheEntry(torch.zeros(1), None, 100))  # evicts b
    assert cache.get(("b",)) is None and cache.get(("c",)) is not None
    assert (cache.bytes, len(cache), cache.evictions, cache.hits, cache.misses) == (300, 3, 1, 2, 1)
    assert not cache.put(("e",), CacheEntry(torch.zeros(1), None, 301))  # alone over the cap: not stored
    assert cache.bytes == 300


def test_kv_bytes_counts_every_layer():
    from transformers import DynamicCache

    from vzedge.serve.cache import kv_bytes

    cache = DynamicCache()
    for layer in range(3):
        cache.update(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), layer)
    assert kv_bytes(cache) == 3 * 2 * (2 * 5 * 8) * 4


def test_top_p_sampling_keeps_the_smallest_set():
    from vzedge.runtime.backends.llm import sample_token

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert sample_token(logits, 0.0, 1.0, None) == 0
    g = torch.Generator().manual_seed(0)
    drawn = {sample_token(logits, 1.0, 0.75, g) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.75; 2 and 3 are never drawn
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_token(logits, 1.0, 1.0, g) for _ in range(2000)]), minlength=4)
    assert torch.allclose(counts.float() / 2000, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_image_decoding_hash_and_refusals(tmp_path):
    from PIL import Image

    from vzedge.images import demo_image
    from vzedge.serve.errors import RequestError
    from vzedge.serve.images import decode_image_url

    img = demo_image(seed=2)
    png = _png(img)
    a = decode_image_url("data:image/png;base64," + base64.b64encode(png).decode(), None, 10**7, "p")
    (tmp_path / "x.png").write_bytes(png)
    b = decode_image_url("file://" + str(tmp_path / "x.png"), str(tmp_path), 10**7, "p")
    c = decode_image_url("x.png", str(tmp_path), 10**7, "p")
    assert a.sha256 == b.sha256 == c.sha256  # the same pixels, however they came
    assert a.image.tobytes() == img.tobytes()
    buf = io.BytesIO()
    img.save(buf, "WEBP", lossless=True)
    w = decode_image_url("data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode(), None, 10**7, "p")
    assert w.sha256 == a.sha256
    gif = io.BytesIO()
    img.save(gif, "GIF")
    cases = [
        ("data:image/gif;base64," + base64.b64encode(gif.getvalue()).decode(), None, "image/png"),
        ("data:;base64," + base64.b64encode(gif.getvalue()).decode(), None, "format GIF"),
        ("data:image/png;base64," + base64.b64encode(png[:200]).decode(), None, "cannot be decoded"),
        ("data:image/png," + "abc", None, "must be base64"),
        ("x.png", None, "--image-root DIR"),
        ("../x.png", str(tmp_path / "sub"), "outside --image-root"),
        ("ftp://host/x.png", None, "scheme 'ftp'"),
    ]
    (tmp_path / "sub").mkdir()
    for url, root, fragment in cases:
        with pytest.raises(RequestError, match=fragment.replace("(", r"\(")) as err:
            decode_image_url(url, root, 10**7, "p")
        assert err.value.status == 400 and err.value.param == "p"
    big = _png(Image.new("L", (3000, 3000)))
    with pytest.raises(RequestError, match="9000000 pixels"):
        decode_image_url("data:image/png;base64," + base64.b64encode(big).decode(), None, 4_000_000, "p")


def test_a_model_that_does_not_load_stops_the_server_with_status_2():
    import socket

    for module in ("fastapi", "uvicorn", "prometheus_client"):
        pytest.importorskip(module, reason="pip install 'vzedge[serve]'")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "vzedge", "serve", "--model", "/nonexistent/model", "--port", str(port)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "vzedge serve: error: --model '/nonexistent/model' is neither a built-in model" in proc.stderr


def test_answer_text_holds_back_what_may_change():
    from vzedge.serve.engine import answer_text

    assert answer_text(" green", [], False) == ("green", 5, False)
    assert answer_text(" green ", [], False) == ("green ", 5, False)  # a space waits for what follows it
    assert answer_text(" green ", [], True) == ("green", 5, False)
    assert answer_text("gre", ["ee", "x"], False) == ("gre", 2, False)  # "e" may start "ee"
    assert answer_text("green", ["ee", "x"], False) == ("gr", 2, True)
    assert answer_text("a x b ee", ["ee", "x"], False) == ("a", 1, True)  # the earliest stop wins
    assert answer_text("caf\ufffd\ufffd", [], False) == ("caf\ufffd\ufffd", 3, False)  # half of a character


def test_engine_times_out_a_long_request_and_keeps_serving():
    """The engine alone (no HTTP): a request past its timeout ends with a 504 naming the fix, a failure inside the
    engine with a 500; the next request runs."""
    import queue

    from vzedge.images import demo_image
    from vzedge.serve.config import ServeConfig
    from vzedge.serve.engine import Engine, Job
    from vzedge.serve.images import DecodedImage

    engine = Engine(ServeConfig(warmup=False, threads=1))
    engine.start()
    try:
        assert engine.ready.wait(120), engine.load_error
        image = DecodedImage(demo_image(), "demo", 0)

        def run(max_tokens: int, timeout_s: float) -> tuple[str, object]:
            events: queue.Queue = queue.Queue()
            job = Job("USER: ", "\nWhat is it? ASSISTANT:", image, max_tokens, events.put, ignore_eos=True)
            job.timeout_s = timeout_s
            engine.submit(job)
            while True:
                kind, value = events.get(timeout=120)
                if kind != "delta":
                    return kind, value

        kind, err = run(1500, 0.3)  # would need 0.2 ms per token to finish in time
        assert kind == "error" and err.status == 504 and "--timeout" in err.message
        kind, info = run(3, 60.0)
        assert kind == "done" and info["completion_tokens"] == 3 and info["finish_reason"] == "length"

        def boom(prefix):
            raise RuntimeError("boom")

        engine.session.llm.copy_prefix = boom  # a failure inside the engine fails that request only
        kind, err = run(3, 60.0)
        assert kind == "error" and err.status == 500 and "boom" in err.message
        del engine.session.llm.copy_prefix
        kind, info = run(3, 60.0)
        assert kind == "done" and info["cache_hit"] and info["completion_tokens"] == 3
    finally:
        engine.stop(30)


def test_missing_http_stack_names_the_extra():
    code = (
        "import sys\n"
        "sys.modules['fastapi'] = None  # as if it were not installed\n"
        "from vzedge.serve import ServeConfig, create_app\n"
        "try:\n"
        "    create_app(ServeConfig())\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert "fastapi is needed for vzedge serve: pip install 'vzedge[serve]'" in out.stdout
