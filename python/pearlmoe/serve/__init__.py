"""pearlmoe serve: an OpenAI-compatible HTTP server over a continuous-batching engine."""

from .engine import MODES, Engine, Request

__all__ = ["MODES", "Engine", "Request"]
