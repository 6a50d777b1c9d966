"""The edge half of the edge-to-server split (vzedge.runtime.remote), without a server.

The round trip through a real vLLM server is in tests/test_vllm.py (needs VZEDGE_VLLM_PYTHON).
"""

from __future__ import annotations

import base64
import io
import socket

import numpy as np
import pytest
import torch

from vzedge.runtime.remote import RemoteError, RemoteLLM, encode_embeds


@pytest.mark.parametrize(("wire", "itemsize", "tol"), [("float32", 4, 0.0), ("float16", 2, 1e-3)])
def test_embeds_round_trip_and_bytes(wire, itemsize, tol):
    tokens = torch.randn(1, 64, 128, generator=torch.Generator().manual_seed(0))
    b64, n = encode_embeds(tokens, wire)
    raw = base64.b64decode(b64)
    assert len(raw) == n
    arr = np.load(io.BytesIO(raw))  # what vLLM's ImageEmbeddingMediaIO reads (numpy magic prefix)
    assert arr.shape == (64, 128) and arr.dtype == np.dtype(wire)
    assert n - 64 * 128 * itemsize <= 128  # the .npy header is all the overhead
    rel = float(np.abs(arr.astype(np.float32) - tokens[0].numpy()).max() / tokens.abs().max())
    assert rel <= tol


def test_bad_embeds_and_clients_are_refused():
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        encode_embeds(torch.zeros(2, 64, 8))
    with pytest.raises(ValueError, match="wire_dtype"):
        encode_embeds(torch.zeros(64, 8), "int8")
    with pytest.raises(ValueError, match="http"):
        RemoteLLM("127.0.0.1:8000", "tiny")
    assert RemoteLLM("http://h:1/", "m").base == "http://h:1/v1"
    assert RemoteLLM("http://h:1/v1", "m").base == "http://h:1/v1"


def test_unreachable_server_names_the_url():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = RemoteLLM(f"http://127.0.0.1:{port}", "tiny", timeout_s=5)
    with pytest.raises(RemoteError, match=f"cannot reach http://127.0.0.1:{port}/v1"):
        client.answer(torch.zeros(64, 8), "What colour?")


def test_run_remote_refuses_a_local_llm_option():
    from vzedge.cli import run

    assert run(["run", "--model", "tiny", "--remote", "http://127.0.0.1:9", "--quant", "nf4"]) == 2
    assert run(["run", "--model", "tiny", "--remote", "http://127.0.0.1:9", "--all-tokens"]) == 2
