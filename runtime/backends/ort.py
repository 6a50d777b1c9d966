"""ONNX Runtime vision backend (CPU, CUDA or TensorRT execution provider), driven by the manifest."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vzedge._deps import require
from vzedge.manifest import MANIFEST_NAME, inside
from vzedge.ort_providers import ort_tensorrt_providers, providers_for
from vzedge.runtime.backends.base import VisionBackend, manifest_adaptive, pick_buckets
from vzedge.runtime.preprocess import Preprocess

log = logging.getLogger(__name__)


class OrtVisionBackend(VisionBackend):
    def __init__(self, folder: Path, manifest: dict[str, Any], backend: str = "auto", projector: Any = None) -> None:
        ort = require("onnxruntime", "the ONNX Runtime vision backend")
        graph = manifest["graph"]
        self.manifest = manifest
        self.input_name = graph["inputs"][0]["name"]
        self.output_name = graph["outputs"][0]["name"]
        self.kept_name = graph["outputs"][1]["name"]
        self.num_tokens = int(manifest["visionzip"]["dominant"]) + int(manifest["visionzip"]["contextual"])
        self.preprocess = Preprocess.from_manifest(manifest["preprocess"])
        self.max_batch = int(graph.get("batch", {}).get("max", 1))
        found = manifest_adaptive(manifest, folder)
        self.adaptive, self.adaptive_block = found if found is not None else (None, None)
        available = ort.get_available_providers()
        # The graph's precision comes from the manifest: it decides which execution providers can run it.
        self.dtype = str(graph.get("dtype", "fp32"))
        if self.dtype == "int8" and backend == "ort-trt":
            raise ValueError(
                f"{folder} is a dynamic int8 export (MatMulInteger), which TensorRT does not parse: ORT would split "
                "the graph at every int8 layer. Use --vision-backend ort-cpu, or export --dtype int8-static "
                "(TensorRT's explicit int8) or fp16 for TensorRT"
            )
        if backend == "ort-trt":
            if "TensorrtExecutionProvider" not in available:
                raise ValueError(
                    f"--vision-backend ort-trt: this onnxruntime offers {available}; install onnxruntime-gpu built "
                    "with TensorRT"
                )
            h, w = self.preprocess.output_size
            providers = ort_tensorrt_providers(
                folder / "trt_cache", self.input_name, (3, h, w), self.max_batch, int8=self.dtype == "int8-static"
            )
        else:
            providers = providers_for(backend, available)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        path = inside(folder, graph["file"], "graph.file")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as err:  # ORT's own exception types (InvalidProtobuf, Fail, ...) carry no common base
            raise ValueError(
                f"{path} is not a graph ONNX Runtime can load ({type(err).__name__}: {' '.join(str(err).split())}); "
                "re-export the model"
            ) from None
        check_graph(self.session, manifest, folder)
        self.providers = self.session.get_providers()
        self.name = f"ort-{self.providers[0].replace('ExecutionProvider', '').lower()}"
        if self.adaptive is not None:
            self.name += f"-adaptive-{'/'.join(map(str, self.adaptive.buckets))}"
        # An export without --projector gives vision-width tokens: the LLM model's projector runs after it.
        self.projector = projector.projector if projector is not None else None
        self.projected = True if projector is not None else bool(manifest["projector"])
        log.info("ORT vision graph %s (%s) on %s", graph["file"], self.dtype, self.providers)

    @torch.inference_mode()
    def encode_with_kept(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, kept_indices) of a batch of crops, run as one graph batch (chunks of the export's max batch)."""
        outs = []
        for i in range(0, len(pixel_values), self.max_batch):
            x = np.ascontiguousarray(pixel_values[i : i + self.max_batch].detach().cpu().numpy().astype(np.float32))
            outs.append(self.session.run([self.output_name, self.kept_name], {self.input_name: x}))
        tokens = torch.from_numpy(np.concatenate([o[0] for o in outs]).astype(np.float32))
        kept = torch.from_numpy(np.concatenate([o[1] for o in outs]))
        if self.projector is not None:
            p = next(self.projector.parameters())
            tokens = self.projector(tokens.to(p.device, p.dtype))
        return tokens, kept

    @torch.inference_mode()
    def encode_each(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if self.adaptive_block is None:
            return super().encode_each(pixel_values)
        names = [o.name for o in self.session.get_outputs()]
        out: list[torch.Tensor] = []
        for i in range(0, len(pixel_values), self.max_batch):
            x = np.ascontiguousarray(pixel_values[i : i + self.max_batch].detach().cpu().numpy().astype(np.float32))
            got = dict(zip(names, self.session.run(names, {self.input_name: x}), strict=True))
            out += [t.float() for t in pick_buckets(got, self.adaptive_block)]
        if self.projector is not None:
            p = next(self.projector.parameters())
            out = [self.projector(t.to(p.device, p.dtype)) for t in out]
        return out

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[0] > self.max_batch:
            raise ValueError(f"batch {pixel_values.shape[0]} exceeds the export's max batch {self.max_batch}")
        x = np.ascontiguousarray(pixel_values.detach().cpu().numpy().astype(np.float32))
        (tokens,) = self.session.run([self.output_name], {self.input_name: x})
        out = torch.from_numpy(np.asarray(tokens, dtype=np.float32))
        if self.projector is not None:
            p = next(self.projector.parameters())
            out = self.projector(out.to(p.device, p.dtype))
        return out


def check_graph(session: Any, manifest: dict[str, Any], folder: Path) -> None:
    """What the graph really takes and gives (names, shapes, token count) must be what the manifest says.

    The manifest is the runtime's only description of the graph; an edited one would make reports claim
    token counts the graph does not produce, so the graph is run once on a zero batch and compared.
    """
    where = f"{folder}/{MANIFEST_NAME}"
    graph, vz = manifest["graph"], manifest["visionzip"]
    try:
        inputs, outputs = graph["inputs"], graph["outputs"]
        in_name, in_shape = inputs[0]["name"], list(inputs[0]["shape"])
        tok_name, kept_name = outputs[0]["name"], outputs[1]["name"]
        k = int(vz["dominant"]) + int(vz["contextual"])
        # Columns of kept_indices: the selector's record (divprune/vispruner keep all K, pool none), else dominant.
        dominant = int((manifest.get("selector") or {}).get("kept_indices", vz["dominant"]))
        tok_shape = list(outputs[0]["shape"])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: graph inputs/outputs or visionzip block malformed ({err!r}); re-export") from None
    real_in = [i.name for i in session.get_inputs()]
    real_out = [o.name for o in session.get_outputs()]
    if real_in != [in_name] or real_out[:2] != [tok_name, kept_name]:
        raise ValueError(
            f"{where} names inputs {[in_name]} and outputs {[tok_name, kept_name]}, but the graph has {real_in} -> "
            f"{real_out}; re-export the model"
        )
    if len(in_shape) != 4 or tok_shape[1:2] != [k]:
        raise ValueError(f"{where}: input shape {in_shape} / tokens shape {tok_shape} do not match {k} tokens")
    pre = Preprocess.from_manifest(manifest["preprocess"])
    size = None
    with contextlib.suppress(ValueError):  # shortest-edge without a crop has no fixed size to compare
        size = list(pre.output_size)
    if size is not None and size != [int(d) for d in in_shape[2:]]:
        raise ValueError(
            f"{where}: preprocessing makes {size} images but the graph takes {in_shape[2:]}; re-export the model"
        )
    h, w = (int(d) for d in in_shape[2:])
    zeros = np.zeros((1, int(in_shape[1]), h, w), np.float32)
    tokens, kept = session.run([tok_name, kept_name], {in_name: zeros})
    want = [1, k, int(tok_shape[2])] if isinstance(tok_shape[2], int) else [1, k, tokens.shape[-1]]
    if list(tokens.shape) != want or list(kept.shape) != [1, dominant]:
        raise ValueError(
            f"{where} says tokens {want} and kept_indices [1, {dominant}] for one image, but the graph gives "
            f"{list(tokens.shape)} and {list(kept.shape)}; the manifest does not describe this graph: re-export"
        )
    if manifest.get("adaptive") is not None:
        check_adaptive_graph(session, manifest["adaptive"], folder, int(tokens.shape[-1]), zeros.shape)


def check_adaptive_graph(session: Any, block: dict[str, Any], folder: Path, width: int, shape: tuple[int, ...]) -> None:
    """An adaptive export's graph must give every bucket's tokens [1, K, width] and a bucket index [1] per image."""
    where = f"{folder}/{MANIFEST_NAME}"
    real = [o.name for o in session.get_outputs()]
    names = [n for o in block["outputs"] for n in (o["tokens"], o["kept_indices"])] + [block["bucket_output"]]
    if missing := [n for n in names if n not in real]:
        raise ValueError(f"{where} names adaptive outputs {missing} the graph does not have ({real}); re-export")
    got = dict(zip(real, session.run(real, {session.get_inputs()[0].name: np.zeros(shape, np.float32)}), strict=True))
    for o in block["outputs"]:
        if list(got[o["tokens"]].shape) != [1, int(o["bucket"]), width]:
            raise ValueError(
                f"{where}: bucket {o['bucket']} output {o['tokens']} gives {list(got[o['tokens']].shape)} for one "
                f"image, not [1, {o['bucket']}, {width}]: the manifest does not describe this graph; re-export"
            )
    if list(got[block["bucket_output"]].shape) != [1]:
        raise ValueError(f"{where}: the graph's bucket output is not one index per image; re-export")
