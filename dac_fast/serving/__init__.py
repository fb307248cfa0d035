"""Serving many exact streams: a scheduler thread owning one model (``Scheduler``), an ASGI server
(``dac_fast.serving.server``, ``dac-fast serve``) and its client (``Client``).

``Scheduler`` needs only torch; the server and the client need the ``[serve]`` extra (starlette, uvicorn,
websockets, prometheus-client) and import it only when used."""

from .._lazy import lazy_module
from .scheduler import Busy, Scheduler, Stream, StreamClosed

__getattr__, __dir__ = lazy_module(__name__, {"Client": "client", "create_app": "server"})
__all__ = ["Busy", "Client", "Scheduler", "Stream", "StreamClosed", "create_app"]
