"""The perception loop: capture -> preprocess + vision -> LLM, sequential or pipelined.

Pipelined, each stage runs on its own thread with a bounded queue in front of it, so the vision
stage of frame t+1 overlaps the LLM stage of frame t (on CUDA each worker uses its own stream).
Policy `latest` (the robotics default) replaces a waiting frame with the newer one and counts the
old one as dropped; `all` blocks capture instead. Every frame ends processed, dropped or failed:
none is lost silently, including on Ctrl-C or when a stage throws.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from vzedge.bench import sync
from vzedge.runtime.backends.llm import LLMBackend, Prefix
from vzedge.runtime.backends.vision import TokenCache, VisionBackend
from vzedge.runtime.metrics import FrameRecord, RunMetrics
from vzedge.runtime.sources import Frame, Source
from vzedge.runtime.textstage import RuntimeTextStage

log = logging.getLogger(__name__)

_END = object()
_POLL_S = 0.05


@dataclass
class _Item:
    """One question's worth of input: a clip of consecutive frames (one frame unless clip > 1).

    Stage times are recorded under the clip's first frame; every frame of the clip shares its fate.
    """

    frames: list[Frame]
    tokens: torch.Tensor | None = None
    key: str | None = None

    @property
    def frame(self) -> Frame:
        return self.frames[0]

    @property
    def indices(self) -> list[int]:
        return [f.index for f in self.frames]


class StageError(RuntimeError):
    """A stage threw and the loop was told to stop (on_error='stop')."""


class Pipeline:
    """Runs frames from `source` through the vision and LLM backends, recording into `metrics`."""

    def __init__(
        self,
        vision: VisionBackend,
        llm: LLMBackend,
        prompt: str,
        *,
        policy: str = "latest",
        queue_size: int = 1,
        max_new_tokens: int = 16,
        on_error: str = "stop",
        token_cache: int = 8,
        clip: int = 1,
        metrics: RunMetrics | None = None,
        on_frame: Callable[[FrameRecord], None] | None = None,
        text_stage: RuntimeTextStage | None = None,
    ) -> None:
        if policy not in ("latest", "all"):
            raise ValueError(f"policy {policy!r} is not 'latest' (drop stale frames) or 'all' (process every frame)")
        if on_error not in ("stop", "continue"):
            raise ValueError(f"on_error {on_error!r} is not 'stop' or 'continue'")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if clip < 1:
            raise ValueError(f"clip must be >= 1 frame per question, got {clip}")
        self.clip = clip
        self.vision, self.llm, self.prompt = vision, llm, prompt
        self.policy, self.queue_size, self.max_new_tokens = policy, queue_size, max_new_tokens
        self.on_error = on_error
        self.cache = TokenCache(token_cache)
        self.metrics = metrics or RunMetrics()
        self.on_frame = on_frame
        self.text_stage = text_stage
        self.stop = threading.Event()
        self.interrupted = False
        self.first_error: BaseException | None = None
        self._last_prefix: tuple[str, Prefix] | None = None

    # -- stages ---------------------------------------------------------------------------------
    def _vision_stage(self, item: _Item) -> None:
        m, idx = self.metrics, item.frame.index
        for f in item.frames:
            if f.error is not None:  # the source could not read it: this frame fails, the loop goes on
                raise f.error
        t0 = time.perf_counter()
        prepared = self.vision.prepare([f.image for f in item.frames])
        t1 = time.perf_counter()
        m.stage(idx, "preprocess", (t1 - t0) * 1e3)
        item.key = TokenCache.key(prepared.pixels)
        tokens = self.cache.get(item.key)
        hit = tokens is not None
        if tokens is None:
            # Each frame is compressed on its own; a clip's tokens follow one another in frame order.
            tokens = self.vision.encode_prepared(prepared)
            sync(tokens.device)
            self.cache.put(item.key, tokens)
        m.frame(idx).cache_hit = hit
        m.frame(idx).image_tokens = int(tokens.shape[1])
        m.stage(idx, "vision", (time.perf_counter() - t1) * 1e3)
        item.tokens = tokens

    def _llm_stage(self, item: _Item) -> None:
        m, idx = self.metrics, item.frame.index
        assert item.tokens is not None and item.key is not None
        if self._last_prefix is not None and self._last_prefix[0] == item.key:
            # The loop asks one question, so with the text stage the same image still selects the same tokens.
            prefix, prefill_ms = self._last_prefix[1], 0.0
        else:
            self._last_prefix = None  # free the previous frame's KV before building this one
            tokens = item.tokens[:1]
            if self.text_stage is not None:
                tokens, ms = self.text_stage.select(tokens, self.prompt, len(item.frames))
                m.stage(idx, "text_stage", ms)
            prefix = self.llm.prefill_image(tokens, defer=True)  # runs with the first question
            prefill_ms = prefix.prefill_ms
            self._last_prefix = (item.key, prefix)
        ans = self.llm.answer(prefix, self.prompt, self.max_new_tokens)
        rec = m.frame(idx)
        if self.text_stage is not None:  # the question saw stage 2's tokens, not stage 1's
            rec.image_tokens = self.text_stage.k * len(item.frames)
        m.stage(idx, "prefill", prefill_ms + ans.prefill_ms)
        m.stage(idx, "ttft", prefill_ms + ans.ttft_ms)
        m.stage(idx, "decode_per_token", ans.decode_ms_per_token)
        rec.new_tokens, rec.answer = len(ans.token_ids), ans.text
        m.stage(idx, "end_to_end", (time.perf_counter() - item.frame.captured_at) * 1e3 + item.frame.capture_ms)
        for i in item.indices:
            m.processed(i)
        if self.on_frame is not None:
            self.on_frame(rec)

    def _guarded(self, stage: str, item: _Item, fn: Callable[[_Item], None]) -> bool:
        try:
            fn(item)
            return True
        except Exception as err:  # a stage that throws is reported and the frame counted, not lost
            log.error("frame %d failed in %s: %s", item.frame.index, stage, err)
            for i in item.indices:
                self.metrics.failed(i, stage, err)
            if self.on_frame is not None:
                self.on_frame(self.metrics.frame(item.frame.index))
            if self.on_error == "stop":
                self.first_error = self.first_error or err
                self.stop.set()
            return False

    def _drop(self, item: _Item, at: str) -> None:
        for i in item.indices:
            self.metrics.dropped(i, at)
        if self.on_frame is not None:
            self.on_frame(self.metrics.frame(item.frame.index))

    def _clips(self, source: Source) -> Iterator[_Item]:
        """Group the source's frames into clips of `self.clip`; a trailing partial clip is dropped, counted."""
        frames: list[Frame] = []
        for frame in source:
            self.metrics.frame(frame.index)
            frames.append(frame)
            if len(frames) == self.clip:
                self.metrics.stage(frames[0].index, "capture", sum(f.capture_ms for f in frames))
                yield _Item(frames)
                frames = []
        if frames:
            self._drop(_Item(frames), "incomplete_clip")

    # -- sequential ---------------------------------------------------------------------------
    def run_sequential(self, source: Source) -> RunMetrics:
        """One frame at a time through every stage (the baseline the pipelined loop is measured against).

        The loop runs on a worker thread, as the pipelined stages do: on a CPU shared with other processes,
        torch ops issued from the main thread were measured 50x slower than the same ops from a worker thread
        (the main thread's OpenMP team spin-waits on descheduled siblings), which would make the comparison
        measure threading, not overlap.
        """
        worker = threading.Thread(target=self._sequential_loop, args=(source,), daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(timeout=0.2)
        except KeyboardInterrupt:
            self.interrupted = True
            self.stop.set()
            worker.join(timeout=10)
        finally:
            source.close()
            self._settle_interrupted()
            self.metrics.finish()
        return self.metrics

    def _sequential_loop(self, source: Source) -> None:
        try:
            for item in self._clips(source):
                if self.stop.is_set():
                    self._drop(item, "shutdown")
                    break
                if self._guarded("vision", item, self._vision_stage):
                    self._guarded("llm", item, self._llm_stage)
                if self.stop.is_set():
                    break
        except KeyboardInterrupt:  # raised by the source itself (e.g. a camera driver), not by the user's Ctrl-C
            self.interrupted = True
            self.stop.set()

    # -- pipelined ------------------------------------------------------------------------------
    def _put(self, q: queue.Queue, item: Any, stage: str) -> None:
        """Put with the policy: `latest` replaces a waiting item (counted as dropped), `all` waits."""
        while not self.stop.is_set():
            try:
                q.put(item, timeout=_POLL_S) if self.policy == "all" or item is _END else q.put_nowait(item)
                return
            except queue.Full:
                if self.policy == "latest" and item is not _END:
                    with contextlib.suppress(queue.Empty):
                        stale = q.get_nowait()
                        if stale is not _END:
                            self._drop(stale, f"queue:{stage}")
        if item is not _END:
            self._drop(item, "shutdown")

    def _get(self, q: queue.Queue) -> Any:
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if self.stop.is_set():
                    return _END

    def _worker(self, inq: queue.Queue, outq: queue.Queue | None, stage: str, fn: Callable[[_Item], None]) -> None:
        stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            while True:
                item = self._get(inq)
                if item is _END:
                    break
                if self.stop.is_set():
                    self._drop(item, "shutdown")
                    continue
                if self._guarded(stage, item, fn) and outq is not None:
                    self._put(outq, item, "llm")
        if outq is not None:
            self._put(outq, _END, "llm")
        self._drain(inq)

    def _drain(self, q: queue.Queue) -> None:
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                return
            if item is not _END:
                self._drop(item, "shutdown")

    def run_pipelined(self, source: Source) -> RunMetrics:
        q_vision: queue.Queue = queue.Queue(maxsize=self.queue_size)
        q_llm: queue.Queue = queue.Queue(maxsize=self.queue_size)
        workers = [
            threading.Thread(target=self._worker, args=(q_vision, q_llm, "vision", self._vision_stage), daemon=True),
            threading.Thread(target=self._worker, args=(q_llm, None, "llm", self._llm_stage), daemon=True),
        ]
        for w in workers:
            w.start()
        try:
            for item in self._clips(source):
                if self.stop.is_set():
                    self._drop(item, "shutdown")
                    break
                self._put(q_vision, item, "vision")
        except KeyboardInterrupt:
            self.interrupted = True
            self.stop.set()
        finally:
            self._put(q_vision, _END, "vision")
            try:
                for w in workers:
                    while w.is_alive():
                        w.join(timeout=0.2)
            except KeyboardInterrupt:
                self.interrupted = True
                self.stop.set()
                for w in workers:
                    w.join(timeout=10)
            self._drain(q_vision)
            self._drain(q_llm)
            source.close()
            self._settle_interrupted()
            self.metrics.finish()
        return self.metrics

    def _settle_interrupted(self) -> None:
        """After an interrupt, a frame read but caught between stages (the signal landed while it was being
        captured or queued) is counted as dropped at shutdown, so the report still accounts for every frame."""
        if not self.interrupted:
            return
        pending = [i for i, r in list(self.metrics.frames.items()) if r.status == "pending"]
        for i in pending:
            self.metrics.dropped(i, "shutdown")
