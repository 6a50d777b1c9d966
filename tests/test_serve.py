"""`vzedge serve`: the real server on 127.0.0.1 (a subprocess, stopped by its pid), spoken to with the `openai`
client. Answers are checked against `vzedge generate` (HF generate on the same image and prompt, no cache)."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the server tests talk through the openai client: pip install openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="pip install 'vzedge[serve]'")
pytest.importorskip("uvicorn", reason="pip install 'vzedge[serve]'")

from vzedge.images import load_image  # noqa: E402
from vzedge.serve.probe import free_port, wait_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
QUESTIONS = ("What colour is the triangle?", "How many shapes are there?")
START_S = 120  # loading on a busy 2-core machine


def data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def user(url: str, question: str) -> dict:
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
    }


class Server:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"serve-{self.port}.log", "w+")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # One torch thread: on a loaded 2-core machine a 2-thread OpenMP team spin-waits on descheduled siblings.
        cmd = [sys.executable, "-m", "vzedge", "serve", "--port", str(self.port), "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            wait_healthy(self.proc, f"{self.base}/health", START_S, logs=self.logs)
        except RuntimeError:
            self.stop()
            raise

    def client(self, key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    load_image("demo:4").save(root / "scene.png")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, image_root):
    s = Server(
        tmp_path_factory.mktemp("serve"),
        "--api-key",
        KEY,
        "--image-root",
        str(image_root),
        "--max-body-mb",
        "1",
        "--max-image-pixels",
        "4000000",
    )
    yield s
    s.stop()


def reference(prompt: str, image: str, visionzip: bool = True) -> str:
    """`vzedge generate`'s greedy answer (HF generate, no cache); `prompt` may be a rendered multi-turn prompt."""
    from vzedge.api import generate
    from vzedge.visionzip import VisionZipConfig

    return generate("tiny", image, prompt, VisionZipConfig() if visionzip else None, max_new_tokens=16)["answer"]


def ask(client, messages, stream: bool = False, **kw) -> tuple[str, dict]:
    if not stream:
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, **kw)
        return r.choices[0].message.content, {"usage": r.usage, "finish": r.choices[0].finish_reason}
    parts, finish, usage = [], None, None
    chunks = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}, **kw
    )
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(parts), {"usage": usage, "finish": finish}


@pytest.mark.slow
def test_answers_equal_generate(server):
    client = server.client()
    for image in ("demo", "demo:3"):
        url = data_url(load_image(image))
        for q in QUESTIONS:
            expected = reference(q, image)
            plain, info = ask(client, [user(url, q)])
            streamed, sinfo = ask(client, [user(url, q)], stream=True)
            assert plain == expected, (image, q)
            assert streamed == expected, (image, q)
            assert info["finish"] == sinfo["finish"] == "stop"
            u = info["usage"]
            assert u.model_extra["images"][0]["visual_tokens"] == 64
            assert u.model_extra["images"][0]["stock_tokens"] == 256
            assert u.total_tokens == u.prompt_tokens + u.completion_tokens
            assert sinfo["usage"].completion_tokens == u.completion_tokens
    # The README's demo answer, as a fixed point.
    assert ask(client, [user(data_url(load_image("demo")), "What colour is the triangle?")])[0] == "blue"


@pytest.mark.slow
def test_follow_up_is_a_cache_hit_and_equals_no_cache(server):
    from vzedge.models.loading import load_model
    from vzedge.prompt import render

    client = server.client()
    image = "demo:5"
    url = data_url(load_image(image))
    first, info = ask(client, [user(url, QUESTIONS[0])])
    assert info["usage"].model_extra["images"][0]["cache_hit"] is False
    assert info["usage"].prompt_tokens_details.cached_tokens == 0
    convo = [
        user(url, QUESTIONS[0]),
        {"role": "assistant", "content": first},
        {"role": "user", "content": QUESTIONS[1]},
    ]
    second, info2 = ask(client, convo)
    assert info2["usage"].model_extra["images"][0]["cache_hit"] is True
    assert info2["usage"].prompt_tokens_details.cached_tokens > 64
    # The same conversation without any cache: rendered by the one prompt builder, answered by HF generate.
    processor = load_model("tiny").processor
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]},
        {"role": "assistant", "content": [{"type": "text", "text": first}]},
        {"role": "user", "content": [{"type": "text", "text": QUESTIONS[1]}]},
    ]
    assert second == reference(render(processor, msgs), image)
    # A local file under --image-root is the same image as its data: URL, so it hits the same entry.
    scene, info3 = ask(client, [user("scene.png", QUESTIONS[0])])
    assert scene == ask(client, [user(data_url(load_image("demo:4")), QUESTIONS[0])])[0]
    assert info3["usage"].model_extra["images"][0]["cache_hit"] is False


@pytest.mark.slow
def test_concurrent_clients_get_correct_answers(server):
    """16 clients x 2 requests: first a new image per 4 clients (concurrent cache misses, batched vision
    passes; answers checked against `vzedge generate`), then images seen before (cache hits)."""
    fresh = [f"demo:{i}" for i in range(20, 24)]
    seen = [f"demo:{i}" for i in (10, 11, 12, 13)]
    urls = {im: data_url(load_image(im)) for im in fresh + seen}
    expected = {(im, QUESTIONS[0]): reference(QUESTIONS[0], im) for im in fresh}
    expected |= {(im, q): ask(server.client(), [user(urls[im], q)])[0] for im in seen for q in QUESTIONS}
    plan = {(c, 0): (fresh[c % 4], QUESTIONS[0]) for c in range(16)}
    plan |= {(c, 1): (seen[c % 4], QUESTIONS[(c // 4) % 2]) for c in range(16)}
    results: dict[tuple[int, int], str] = {}
    errors: list[BaseException] = []

    def client_thread(c: int) -> None:
        client = server.client()
        try:
            for r in range(2):
                im, q = plan[(c, r)]
                answer, _ = ask(client, [user(urls[im], q)], stream=(c + r) % 2 == 0)
                results[(c, r)] = answer
                assert answer == expected[(im, q)], (c, r, im, q, answer)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "clients still waiting after 120 s"
    assert not errors, errors[:3]
    assert len(results) == 32
    # Concurrent cache misses share vision passes: some pass encoded more than one image.
    metrics = httpx.get(f"{server.base}/metrics", timeout=10).text
    batches = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("vzedge_vision_batch")
    }
    assert batches["vzedge_vision_batch_images_sum"] > batches["vzedge_vision_batch_images_count"], batches


def _tiny_png(size: tuple[int, int], mode: str = "RGB") -> str:
    from PIL import Image

    return data_url(Image.new(mode, size))


def _bad_cases(image_root: Path) -> list[tuple[str, dict | bytes, dict, int, str | None, str]]:
    """(name, body, headers, status, param, a fragment of the message)."""
    good = user(data_url(load_image("demo")), "What colour is the triangle?")
    big = "x" * 3000  # the byte-level tokenizer makes this > 2048 tokens
    return [
        ("bad json", b"{not json", {}, 400, None, "not valid JSON"),
        ("not an object", b"[1, 2]", {}, 400, None, "JSON object"),
        ("no messages", {"model": "tiny"}, {}, 400, "messages", "messages"),
        ("unknown model", {"model": "gpt-4o", "messages": [good]}, {}, 404, "model", "use 'tiny'"),
        (
            "no image",
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
            {},
            400,
            "messages",
            "image_url",
        ),
        ("two images", {"model": "tiny", "messages": [good, good]}, {}, 400, "messages.1.content.0.image_url", "1 per"),
        (
            "corrupt",
            {
                "model": "tiny",
                "messages": [user("data:image/png;base64," + base64.b64encode(os.urandom(300)).decode(), "q")],
            },
            {},
            400,
            "messages.0.content.0.image_url",
            "cannot be decoded",
        ),
        (
            "not base64",
            {"model": "tiny", "messages": [user("data:image/png;base64,@@@", "q")]},
            {},
            400,
            "messages.0.content.0.image_url",
            "base64",
        ),
        (
            "text data",
            {"model": "tiny", "messages": [user("data:text/plain;base64,aGVsbG8=", "q")]},
            {},
            400,
            "messages.0.content.0.image_url",
            "image/png",
        ),
        (
            "bomb",
            {"model": "tiny", "messages": [user(_tiny_png((6000, 6000), "1"), "q")]},
            {},
            400,
            "messages.0.content.0.image_url",
            "pixels",
        ),
        (
            "http url",
            {"model": "tiny", "messages": [user("https://example.com/cat.png", "q")]},
            {},
            400,
            "messages.0.content.0.image_url",
            "data:",
        ),
        (
            "outside root",
            {"model": "tiny", "messages": [user(str(image_root.parent / "x.png"), "q")]},
            {},
            400,
            "messages.0.content.0.image_url",
            "outside --image-root",
        ),
        (
            "too big",
            {"model": "tiny", "messages": [user("data:image/png;base64," + "A" * (2 * 2**20), "q")]},
            {},
            413,
            None,
            "--max-body-mb",
        ),
        (
            "long prompt",
            {"model": "tiny", "messages": [user(good["content"][0]["image_url"]["url"], big)]},
            {},
            400,
            "messages",
            "context of 2048",
        ),
        ("max_tokens", {"model": "tiny", "messages": [good], "max_tokens": 5000}, {}, 400, "max_tokens", "at most"),
        ("n", {"model": "tiny", "messages": [good], "n": 2}, {}, 400, "n", "n = 1"),
        (
            "role",
            {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}, good]},
            {},
            400,
            "messages.0.role",
            "user",
        ),
        ("temperature", {"model": "tiny", "messages": [good], "temperature": 7}, {}, 400, "temperature", "temperature"),
        ("wrong key", {"model": "tiny", "messages": [good]}, {"Authorization": "Bearer nope"}, 401, None, "API key"),
        ("no key", {"model": "tiny", "messages": [good]}, {"Authorization": ""}, 401, None, "API key"),
    ]


@pytest.mark.slow
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, image_root):
    import json

    client = server.client()
    good = [user(data_url(load_image("demo")), "What colour is the triangle?")]
    expected = ask(client, good)[0]
    with httpx.Client(base_url=server.base, timeout=60) as http:
        for name, body, headers, status, param, fragment in _bad_cases(image_root):
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers}
            r = http.post("/v1/chat/completions", content=content, headers=h)
            assert r.status_code == status, (name, r.status_code, r.text)
            err = r.json()["error"]
            assert set(err) >= {"message", "type", "param"}, name
            assert err["param"] == param, (name, err)
            assert fragment in err["message"], (name, err["message"])
            assert ask(client, good)[0] == expected, f"after {name}"
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/nothing-here").json()["error"]["message"].startswith("no route")
    # The openai client surfaces the same errors as its own exceptions.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=good)
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").chat.completions.create(model="tiny", messages=good)


@pytest.mark.slow
def test_sampling_seed_and_stop(server):
    client = server.client()
    msgs = [user(data_url(load_image("demo:3")), "What colour is the triangle?")]
    greedy = ask(client, msgs)[0]
    assert greedy == "green"
    a = ask(client, msgs, temperature=1.5, seed=7)[0]
    assert a == ask(client, msgs, temperature=1.5, seed=7)[0]
    assert a == ask(client, msgs, stream=True, temperature=1.5, seed=7)[0]
    seeds = {ask(client, msgs, temperature=2.0, seed=s)[0] for s in range(6)}
    assert len(seeds) > 1, "sampling at temperature 2 gave one answer for six seeds"
    for stream in (False, True):
        text, info = ask(client, msgs, stream=stream, stop=["ee"])
        assert (text, info["finish"]) == ("gr", "stop")
    text, info = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2), None
    assert text.choices[0].finish_reason == "length"
    assert text.usage.completion_tokens == 2


@pytest.mark.slow
def test_metrics_parse(server):
    from prometheus_client.parser import text_string_to_metric_families

    client = server.client()
    ask(client, [user(data_url(load_image("demo")), QUESTIONS[0])])
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "vzedge_requests",
        "vzedge_stage_seconds",
        "vzedge_ttft_seconds",
        "vzedge_request_seconds",
        "vzedge_decode_tokens_per_second",
        "vzedge_queue_depth",
        "vzedge_image_cache_hits",
        "vzedge_image_cache_misses",
        "vzedge_image_cache_bytes",
        "vzedge_process_resident_memory_bytes",
    ):
        assert name in families, name

    def value(name: str, suffix: str = "", **labels: str) -> float:
        return sum(
            s.value
            for s in families[name].samples
            if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("vzedge_requests", "_total", status="200") >= 1
    assert value("vzedge_image_cache_hits", "_total") >= 1
    assert value("vzedge_image_cache_bytes") > 0
    stages = {s.labels["stage"] for s in families["vzedge_stage_seconds"].samples if "stage" in s.labels}
    assert stages == {"decode_image", "vision", "image_prefill", "text_prefill", "decode"}
    assert 50e6 < value("vzedge_process_resident_memory_bytes") < 8e9
    health = httpx.get(f"{server.base}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.slow
def test_all_tokens_queue_limit_and_sigterm_drain(tmp_path):
    """--no-visionzip answers equal generate's; a full queue answers 503 + Retry-After; SIGTERM finishes the
    in-flight stream, then the process exits 0."""
    s = Server(tmp_path, "--no-visionzip", "--max-queue", "1", "--max-active", "1")
    try:
        client = s.client(key="unused")
        url = data_url(load_image("demo:3"))
        answer, info = ask(client, [user(url, QUESTIONS[0])])
        assert answer == reference(QUESTIONS[0], "demo:3", visionzip=False)
        assert info["usage"].model_extra["images"][0] == {"visual_tokens": 256, "stock_tokens": 256, "cache_hit": False}

        n_tokens = 60
        stream = client.chat.completions.create(
            model="tiny", messages=[user(url, QUESTIONS[1])], max_tokens=n_tokens, stream=True,
            extra_body={"ignore_eos": True}, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = iter(stream)
        next(chunks)  # the role chunk: the request is running
        r = httpx.post(
            f"{s.base}/v1/chat/completions",
            json={"model": "tiny", "messages": [user(url, QUESTIONS[0])]},
            timeout=30,
        )
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "busy" in r.json()["error"]["message"]
        os.kill(s.proc.pid, signal.SIGTERM)
        rest = list(chunks)
        usage = [c.usage for c in rest if c.usage is not None]
        finish = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
        assert finish == ["length"] and usage[0].completion_tokens == n_tokens
        assert s.proc.wait(60) == 0, s.logs()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{s.base}/health", timeout=5)
    finally:
        s.stop()
