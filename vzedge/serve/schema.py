"""Request models of the OpenAI chat-completions API (the fields this server reads; unknown fields are ignored,
as OpenAI-compatible servers do) and their conversion into the prompt builder's messages."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vzedge.prompt import IMAGE_TOKEN
from vzedge.serve.errors import RequestError


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens tokens (benchmarks)


def parse_request(data: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field (`param`)."""
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object with model and messages", param=None)
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        # Union members add their type name to the location; drop those parts from the parameter path.
        loc = [str(x) for x in first["loc"] if not (isinstance(x, str) and ("[" in x or x in _MEMBER_TAGS))]
        param = ".".join(loc) or None
        raise RequestError(f"{param or 'body'}: {first['msg']}", param=param, code="invalid_value") from None
    if req.n != 1:
        raise RequestError(f"n = {req.n}: this server returns one choice per request; send n = 1", param="n")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise RequestError("stop: up to 4 non-empty strings", param="stop")
    return req


_MEMBER_TAGS = {"str", "list", "TextPart", "ImagePart", "ImageURL", "function-after", "literal_error"}


def stops_of(req: ChatCompletionRequest) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The text parts of the last user message (what a text-conditioned stage reads as the question)."""
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content.strip()
            return " ".join(p["text"] for p in content or [] if p.get("type") == "text").strip()
    return ""


def to_messages(req: ChatCompletionRequest) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The prompt builder's messages (`{"type": "image"}` parts) and the image URLs in order with their `param`."""
    messages: list[dict[str, Any]] = []
    images: list[tuple[str, str]] = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant"):
            raise RequestError(
                f"messages[{i}].role {m.role!r} is not supported; use system, user or assistant",
                param=f"messages.{i}.role",
            )
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else list(m.content or [])
        content: list[dict[str, Any]] = []
        for j, part in enumerate(parts):
            if isinstance(part, TextPart):
                if IMAGE_TOKEN in part.text:
                    raise RequestError(
                        f"messages[{i}] text contains {IMAGE_TOKEN!r}, the model's image placeholder; send images as "
                        "image_url parts and remove it from the text",
                        param=f"messages.{i}.content",
                    )
                content.append({"type": "text", "text": part.text})
            else:
                if role != "user":
                    raise RequestError(
                        f"messages[{i}] is a {role} message with an image; images go in user messages",
                        param=f"messages.{i}.content.{j}",
                    )
                url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
                images.append((url, f"messages.{i}.content.{j}.image_url"))
                content.append({"type": "image"})
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] == "assistant":
        raise RequestError(
            "the last message is the assistant's; end the conversation with a user message to get an answer",
            param="messages",
        )
    return messages, images


__all__ = ["ChatCompletionRequest", "Message", "last_user_text", "parse_request", "stops_of", "to_messages"]
