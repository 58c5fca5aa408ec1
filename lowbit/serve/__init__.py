"""`lowbit serve`: an OpenAI-compatible HTTP server on the engine's continuous batching.

protocol.py  the request bodies and the error format
worker.py    the thread that owns the model: every request is a sequence of one shared batch
app.py       the routes: check and tokenize a request, submit it, answer whole or streamed
"""
from .app import create_app

__all__ = ["create_app"]
