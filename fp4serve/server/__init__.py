"""The OpenAI-compatible HTTP server: `build_app` over a running AsyncEngine, or `run_server`."""

from fp4serve.server.app import build_app, run_server

__all__ = ["build_app", "run_server"]
