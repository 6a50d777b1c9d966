"""The LLM stage: image tokens in through `inputs_embeds`, a per-frame prefix KV cache, greedy decode.

VisionZip is text-agnostic, so the KV cache of [prompt prefix + image tokens] is computed once per
frame and every question about that frame starts from it: after an answer the cache is cropped back
to the prefix instead of being copied.

A deferred prefix (`prefill_image(..., defer=True)`) holds the prefix's embeddings instead of its cache: the
first question's prefill runs them in the same forward pass, and the crop after that answer leaves the cache of
the prefix alone, as an eager prefill would. One pass instead of two for a new image's first question: every
forward streams all of the LLM's weights (a fixed cost that dominates at a few dozen tokens: ~1.4 s per pass for
a 7B bf16 LLM on a 2-core CPU), so the split costs one extra weight pass per image.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from vzedge.bench import sync

DEFAULT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


@dataclass
class Prefix:
    cache: Any  # transformers Cache holding [prefix text + image tokens] (empty while `pending` is set)
    length: int
    prefill_ms: float
    pending: torch.Tensor | None = None  # deferred: the prefix's embeddings, run with the first question


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    prefill_ms: float  # the question's prefill (the image prefix's too when the prefix was deferred)
    ttft_ms: float
    decode_ms_per_token: float
    first_logits: torch.Tensor


class LLMBackend:
    """Wraps a LLaVA model's language model, embeddings and LM head (quantized or not)."""

    def __init__(
        self, vlm: Any, tokenizer: Any, template: str | None = DEFAULT_TEMPLATE, image_token: str = "<image>"
    ) -> None:
        template = DEFAULT_TEMPLATE if template is None else template
        if template.count(image_token) != 1 or "{question}" not in template:
            raise ValueError(
                f"prompt template {template!r} needs exactly one {image_token} placeholder and a {{question}} field"
            )
        self.vlm = vlm
        self.template = template
        self.tokenizer = tokenizer
        self.lm = vlm.model.language_model
        self.embed = vlm.get_input_embeddings()
        self.lm_head = vlm.lm_head
        self.prefix_text, self.suffix_template = template.split(image_token)
        self.eos_id = tokenizer.eos_token_id
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.hidden_size = int(self.embed.weight.shape[1])

    def _ids(self, text: str, bos: bool) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if bos and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id, *ids]
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def count_tokens(self, text: str, bos: bool = False) -> int:
        """Tokens of `text` as the backend feeds it (with BOS first if `bos`)."""
        return int(self._ids(text, bos=bos).shape[1])

    def prompt_length(self, question: str) -> int:
        """Text tokens the template puts around the image for `question` (BOS, prefix and suffix)."""
        suffix = self.suffix_template.format(question=question)
        return int(self._ids(self.prefix_text, bos=True).shape[1] + self._ids(suffix, bos=False).shape[1])

    @torch.inference_mode()
    def prefill_image(self, image_tokens: torch.Tensor, prefix_text: str | None = None, defer: bool = False) -> Prefix:
        """KV cache of [BOS + prefix text + image tokens]; image_tokens [1, K, D_llm] or [K, D_llm].

        prefix_text: the prompt before the image (default: the template's). defer: build only the embeddings;
        the first `answer`/`stream` on this prefix runs them with its question in one pass (see the module doc).
        """
        from transformers import DynamicCache

        if image_tokens.dim() == 2:
            image_tokens = image_tokens.unsqueeze(0)
        if image_tokens.shape[-1] != self.hidden_size:
            raise ValueError(
                f"image tokens are {image_tokens.shape[-1]} wide but the LLM takes {self.hidden_size}: "
                "export the vision graph with --projector or run the projector first"
            )
        t0 = time.perf_counter()
        text = self.prefix_text if prefix_text is None else prefix_text
        prefix = self.embed(self._ids(text, bos=True))
        embeds = torch.cat([prefix, image_tokens.to(self.device, self.dtype)], dim=1)
        cache = DynamicCache(config=self.vlm.config.text_config)
        if defer:
            return Prefix(cache, embeds.shape[1], (time.perf_counter() - t0) * 1e3, pending=embeds)
        self.lm(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        sync(self.device)
        return Prefix(cache=cache, length=embeds.shape[1], prefill_ms=(time.perf_counter() - t0) * 1e3)

    @staticmethod
    def copy_prefix(prefix: Prefix) -> Prefix:
        """A private copy of a prefix's KV cache, for decoding several answers from one image at the same time."""
        return Prefix(copy.deepcopy(prefix.cache), prefix.length, prefix.prefill_ms, prefix.pending)

    def _with_pending(self, prefix: Prefix, inputs: torch.Tensor) -> torch.Tensor:
        """The question's embeddings, after the deferred prefix's own when it has not run yet."""
        return inputs if prefix.pending is None else torch.cat([prefix.pending, inputs], dim=1)

    def _settle(self, prefix: Prefix) -> None:
        """After an answer: crop the cache back to the prefix. A deferred prefix whose first pass did not complete
        (an error in the forward, a stream closed before its first token) keeps its embeddings and a fresh cache."""
        from transformers import DynamicCache

        seen = prefix.cache.get_seq_length()
        if prefix.pending is not None and seen < prefix.length:
            prefix.cache = DynamicCache(config=self.vlm.config.text_config)
            return
        prefix.pending = None
        if seen > prefix.length:
            prefix.cache.crop(prefix.length - seen)

    @torch.inference_mode()
    def stream(
        self,
        prefix: Prefix,
        text: str,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[int]:
        """The answer's token ids one at a time after [prefix + `text`] (`text`: the prompt after the image).

        The first `next()` runs the text prefill. temperature 0 is greedy; above 0 samples (top-p), drawing from
        `generator` (a CPU generator: the same seed gives the same answer on any device). The prefix cache is
        extended in place and cropped back to the prefix when the generator ends or is closed.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = self._ids(text, bos=False)
        if ids.shape[1] == 0:
            raise ValueError("the prompt after the image is empty; the template must end with the assistant's turn")
        cache = prefix.cache
        try:
            inputs = self._with_pending(prefix, self.embed(ids))
            for _ in range(max_new_tokens):
                h = self.lm(inputs_embeds=inputs, past_key_values=cache, use_cache=True).last_hidden_state
                token = sample_token(self.lm_head(h[:, -1])[0], temperature, top_p, generator)
                del h
                yield token
                if token == self.eos_id and not ignore_eos:
                    return
                inputs = self.embed(torch.tensor([[token]], device=self.device))
        finally:
            self._settle(prefix)

    @torch.inference_mode()
    def answer(
        self,
        prefix: Prefix,
        question: str,
        max_new_tokens: int = 32,
        *,
        ignore_eos: bool = False,
        on_phase: Callable[[str, Any], None] | None = None,
    ) -> Answer:
        """Greedy answer to `question` about the prefix's image; the prefix cache is left as it was.

        ignore_eos: decode exactly `max_new_tokens` (benchmarks, memory validation). on_phase(name, cache) is
        called after the question's prefill ("prefill") and after the last decode step ("decode"), before the
        cache is cropped back, outside the timed spans: a hook for meters (vzedge.runtime.validate).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        cache = prefix.cache
        try:
            t0 = time.perf_counter()
            ids = self._ids(self.suffix_template.format(question=question), bos=False)
            inputs = self._with_pending(prefix, self.embed(ids))
            h = self.lm(inputs_embeds=inputs, past_key_values=cache, use_cache=True).last_hidden_state
            logits = self.lm_head(h[:, -1]).float()
            del h  # the question's hidden states are not needed while decoding
            sync(self.device)
            t_prefill = time.perf_counter()
            first_logits = logits[0].clone()
            out: list[int] = []
            token = int(logits.argmax(-1))
            t_first = time.perf_counter()
            if on_phase is not None:
                on_phase("prefill", cache)
            t_decode = time.perf_counter()
            while True:
                out.append(token)
                if (token == self.eos_id and not ignore_eos) or len(out) >= max_new_tokens:
                    break
                step = torch.tensor([[token]], device=self.device)
                h = self.lm(inputs_embeds=self.embed(step), past_key_values=cache, use_cache=True).last_hidden_state
                token = int(self.lm_head(h[:, -1]).argmax(-1))
            t_end = time.perf_counter()
            if on_phase is not None:
                on_phase("decode", cache)
        finally:
            self._settle(prefix)  # roll the cache back to [prefix + image]
        decoded = [t for t in out if t != self.eos_id]
        n_decode = max(1, len(out) - 1)
        return Answer(
            text=self.tokenizer.decode(decoded, skip_special_tokens=True).strip(),
            token_ids=out,
            prefill_ms=(t_prefill - t0) * 1e3,
            ttft_ms=(t_first - t0) * 1e3,
            decode_ms_per_token=(t_end - t_decode) * 1e3 / n_decode,
            first_logits=first_logits,
        )


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy (temperature 0) or top-p sampling from `logits` [V]; sampling runs on the CPU in float32."""
    if temperature <= 0:
        return int(logits.argmax(-1))
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p (the most likely token always stays).
        sorted_probs[(sorted_probs.cumsum(0) - sorted_probs) >= top_p] = 0.0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
