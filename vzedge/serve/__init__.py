"""`vzedge serve`: an OpenAI-compatible VQA server on VisionZip tokens, with an image cache.

    from vzedge.serve import ServeConfig, create_app, serve

FastAPI, uvicorn and prometheus_client come with `pip install 'vzedge[serve]'` and are imported only when an app is
built, so `import vzedge.serve` stays light.
"""

from __future__ import annotations

from typing import Any

from vzedge.serve.config import ServeConfig, parse_budget


def create_app(config: ServeConfig, engine: Any = None) -> Any:
    """The FastAPI app for `config` (see vzedge.serve.app)."""
    from vzedge.serve.app import create_app as _create_app

    return _create_app(config, engine)


def serve(config: ServeConfig) -> int:
    """Run the server until SIGTERM/SIGINT, draining in-flight requests; returns the exit status."""
    from vzedge.serve.app import serve as _serve

    return _serve(config)


__all__ = ["ServeConfig", "create_app", "parse_budget", "serve"]
