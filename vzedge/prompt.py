"""One prompt builder for `generate`, the runtime and the server.

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": [parts]}` with parts
`{"type": "image"}` or `{"type": "text", "text": ...}` (the shape HF chat templates take). It is rendered with
the processor's chat template where it has one, else with the LLaVA-1.5 format, so a single-turn request to the
server and `vzedge generate` with the same question build the same text.
"""

from __future__ import annotations

from typing import Any

IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")


def _llava_fallback(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """LLaVA-1.5's conversation format (what llava-hf's chat template renders), for processors without one."""
    out = []
    for m in messages:
        body = "".join(f"{IMAGE_TOKEN}\n" if p["type"] == "image" else p["text"] for p in m["content"])
        if m["role"] == "system":
            out.append(f"{body} ")
        elif m["role"] == "user":
            out.append(f"USER: {body} ")
        else:
            out.append(f"ASSISTANT: {body}</s>")
    if add_generation_prompt:
        out.append("ASSISTANT:")
    return "".join(out)


def _check(messages: list[dict[str, Any]]) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise ValueError(f"message {i} has role {m.get('role')!r}; use one of {', '.join(ROLES)}")
        for part in m.get("content", []):
            if part.get("type") not in ("image", "text"):
                raise ValueError(f"message {i} has a content part of type {part.get('type')!r}; use image or text")


def render(processor: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages`, one `<image>` per image part, ending with the assistant's turn to speak."""
    _check(messages)
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return _llava_fallback(messages, add_generation_prompt)


def single_turn(processor: Any, question: str) -> str:
    """The prompt of one question about one image (image first, as LLaVA was trained)."""
    return render(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}])


def question_template(processor: Any) -> str:
    """`single_turn` with a `{question}` field in place of the question (the runtime's per-frame template)."""
    marker = "\x00question\x00"
    text = single_turn(processor, marker).replace("{", "{{").replace("}", "}}")
    return text.replace(marker, "{question}")


__all__ = ["IMAGE_TOKEN", "ROLES", "question_template", "render", "single_turn"]
