"""``python -m llava_san.serve <model>``: an OpenAI-compatible chat API and a small web page for one model.

* :mod:`.requests` checks an OpenAI chat request and turns it into conversation turns + an image
  reference; :mod:`.images` loads that image;
* :mod:`.engine` answers with the model, one generation at a time on a worker thread;
* :mod:`.responses` writes OpenAI's JSON objects; :mod:`.app` has the routes and the error bodies;
* :mod:`.server` runs it with uvicorn; ``page/`` is the web page served at ``/``.

FastAPI and uvicorn are an extra: ``pip install -e '.[serve]'``. Nothing here imports them until an
app is built, so this package (and the request checks) import without them.
"""
from .engine import Engine, Result
from .errors import APIError
from .requests import ChatRequest, ImageRef, parse_chat_request

__all__ = ["APIError", "ChatRequest", "Engine", "ImageRef", "Result", "create_app", "parse_chat_request"]


def create_app(engine: Engine):
    """The FastAPI app of ``engine`` (:func:`llava_san.serve.app.create_app`; needs the ``serve`` extra)."""
    from .app import create_app as _create_app

    return _create_app(engine)
