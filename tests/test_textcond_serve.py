"""`vzedge serve --text-stage K`: the image is encoded once (stage-1 cache entry), each question selects its own K
tokens and prefix, a repeated question is a cache hit; answers equal the runtime's `chat` with the same stage."""

from __future__ import annotations

import queue

import pytest

from tests.test_serve import Server, ask, data_url, user
from vzedge.images import demo_image, load_image
from vzedge.serve.schema import last_user_text

QUESTIONS = ("What colour is the triangle?", "How many shapes are there?")


def test_last_user_text_is_the_current_question():
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
        {"role": "user", "content": [{"type": "text", "text": " And its colour? "}]},
    ]
    assert last_user_text(messages) == "And its colour?"
    assert last_user_text([{"role": "user", "content": [{"type": "image"}]}]) == ""
    assert last_user_text([{"role": "user", "content": "plain"}]) == "plain"


def test_engine_encodes_each_image_once_and_keys_prefixes_by_question():
    from vzedge.serve.config import ServeConfig
    from vzedge.serve.engine import Engine, Job
    from vzedge.serve.images import DecodedImage

    engine = Engine(ServeConfig(warmup=False, threads=1, visionzip=None, text_stage=14))
    engine.start()
    try:
        assert engine.ready.wait(120), engine.load_error
        assert engine.image_tokens == 14
        image = DecodedImage(demo_image(), "demo", 0)

        def run(question: str) -> dict:
            events: queue.Queue = queue.Queue()
            engine.submit(Job("USER: ", f"\n{question} ASSISTANT:", image, 3, events.put, question=question))
            while True:
                kind, value = events.get(timeout=120)
                if kind != "delta":
                    assert kind == "done", value
                    return value

        first = run(QUESTIONS[0])
        assert first["visual_tokens"] == 14 and not first["cache_hit"] and engine.stage1_encoded == 1
        other = run(QUESTIONS[1])
        assert not other["cache_hit"] and engine.stage1_encoded == 1  # a new question, the same cached image
        again = run(QUESTIONS[0])
        assert again["cache_hit"] and again["text"] == first["text"] and engine.stage1_encoded == 1
    finally:
        engine.stop(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve-text"), "--all-tokens", "--text-stage", "14")
    yield s
    s.stop()


@pytest.mark.slow
def test_server_answers_with_the_text_stage_like_chat(server, tmp_path):
    from vzedge.runtime.api import chat
    from vzedge.runtime.config import RunConfig

    client = server.client(key="unused")
    card = client.models.list().data[0]
    assert card.model_extra["text_conditioned"] is True and card.model_extra["image_tokens"] == 14
    image = load_image("demo:3")
    url = data_url(image)
    answers = []
    for q in (*QUESTIONS, QUESTIONS[0]):
        answer, info = ask(client, [user(url, q)])
        answers.append(answer)
        images = info["usage"].model_extra["images"][0]
        assert images["visual_tokens"] == 14
    assert answers[2] == answers[0]
    assert [info["usage"].model_extra["images"][0]["cache_hit"]] == [True]  # the repeated question
    path = tmp_path / "scene.png"
    image.save(path)
    cfg = RunConfig(model="tiny", visionzip=None, text_stage=14, source=str(path), max_new_tokens=16)
    assert [t["answer"] for t in chat(cfg, list(QUESTIONS))["turns"]] == answers[:2]
