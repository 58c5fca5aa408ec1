"""`lowbit serve`: an OpenAI-compatible HTTP server on the engine's continuous batching.

protocol.py  the request bodies and the error format
worker.py    the thread that owns the model: every request is a sequence of one shared batch
app.py       the routes: check and tokenize a request, submit it, answer whole or streamed
tp.py        `serve --tp N`: rank 0 serves and leads, the other ranks follow its engine's steps

`create_app` is imported on first use, so the ranks that only follow (and the launcher) do not
load the web stack.
"""

__all__ = ["create_app"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'lowbit.serve' has no attribute {name!r}")
