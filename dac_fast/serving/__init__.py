"""Serving many exact streams: a scheduler thread owning one model (``Scheduler``), an ASGI server
(``create_app``, ``dac-fast serve``) and its client (``Client``).

Imported lazily: ``Scheduler`` needs only torch; the server and the client need the ``[serve]`` extra
(starlette, uvicorn, websockets, prometheus-client) and import it only when used."""

from .._lazy import lazy_module

__getattr__, __dir__ = lazy_module(__name__, {
    "Busy": "scheduler", "Scheduler": "scheduler", "Stream": "scheduler", "StreamClosed": "scheduler",
    "Client": "client", "ServerClosed": "client", "create_app": "server",
})
__all__ = ["Busy", "Client", "Scheduler", "ServerClosed", "Stream", "StreamClosed", "create_app"]
