"""Starting a server as a child process: a free local port, and waiting until its GET /health answers 200.

Used by the benchmark scripts and the tests that start `vzedge serve` (either engine); standard library only, so
it needs none of the `serve` extra.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(
    proc: subprocess.Popen, url: str, timeout_s: float, logs: Callable[[], str] = str, poll_s: float = 0.5
) -> float:
    """Poll `url` (a /health endpoint) until it answers 200; return the seconds waited. RuntimeError, ending with
    `logs()`, when `proc` exits first or `timeout_s` passes (the caller stops the process)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{logs()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except OSError:  # refused while starting, or 503 while the model loads
            pass
        time.sleep(poll_s)
    raise RuntimeError(f"the server did not answer 200 on {url} in {timeout_s:g} s:\n{logs()}")
