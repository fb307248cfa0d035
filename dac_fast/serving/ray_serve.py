"""``dac-fast serve --ray``: the same Starlette app (``create_app``) as a Ray Serve deployment. Each replica loads
its own model and runs its own ``Scheduler``; Ray Serve's HTTP proxy (on every node) routes each WebSocket stream
and HTTP request to one replica, so the endpoints and the protocol are those of ``dac-fast serve``.

Ray is imported only when a deployment is built (``pip install 'dac-fast[serve-ray]'``)."""

from __future__ import annotations

import signal
import time
from typing import Any

APP_NAME = "dac-fast"
DEPLOYMENT_NAME = "DacServe"
CONTROL_REQUESTS = 8  # /healthz and /metrics calls a replica takes beside its streams and whole-file requests


def replica_app(model: Any, device: str | None, seed: int, threads: int | None, scheduler_options: dict,
                app_options: dict):
    """The ASGI app of one replica: ``model`` loaded here (on the replica's GPU when Ray gave it one), one
    ``Scheduler``, started and stopped by the app's lifespan, which Ray Serve runs."""
    import torch

    from ..job_model import load_model
    from .scheduler import Scheduler
    from .server import create_app

    if threads:
        torch.set_num_threads(threads)
    scheduler = Scheduler(load_model(model, device, seed=seed, quiet=True), **scheduler_options)
    return create_app(scheduler, **app_options)


def most_ongoing_requests(scheduler_options: dict) -> int:
    """Requests one replica accepts at once: every stream and whole-file request its scheduler holds or lets
    wait, so that a full replica answers 1013 / 503 itself instead of Ray queueing the client silently."""
    from inspect import signature

    from .scheduler import Scheduler

    defaults = {name: p.default for name, p in signature(Scheduler).parameters.items()}
    value = {**defaults, **scheduler_options}
    streams = value["decode_slots"] + value["encode_slots"] + 2 * value["waiting"]  # `waiting` is per lane
    return streams + value["offline_queue"] + CONTROL_REQUESTS


def ray_application(model: Any, *, device: str | None = None, seed: int = 0, threads: int | None = None,
                    scheduler_options: dict | None = None, app_options: dict | None = None, num_replicas: int = 1,
                    num_cpus: float = 1, num_gpus: float = 0):
    """The bound Ray Serve application for ``serve.run``: ``num_replicas`` replicas, each reserving
    ``num_cpus`` CPUs and ``num_gpus`` GPUs and serving ``create_app(Scheduler(model, **scheduler_options),
    **app_options)``. ``model`` is a spec ``load_model`` accepts (a path every node sees, a hub id, a preset)."""
    from ..io import require

    serve = require("ray.serve", "dac-fast serve --ray")
    scheduler_options, app_options = dict(scheduler_options or {}), dict(app_options or {})
    replica = dict(model=model, device=device, seed=seed, threads=threads, scheduler_options=scheduler_options,
                   app_options=app_options)

    def build_asgi_app():  # Ray Serve's builder form: called once in each replica, after it is placed
        return replica_app(**replica)

    ingress = serve.ingress(build_asgi_app)()
    deployment = serve.deployment(
        ingress, name=DEPLOYMENT_NAME, num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=most_ongoing_requests(scheduler_options))
    return deployment.bind()


def serve_on_ray(args, scheduler_options: dict, app_options: dict) -> int:
    """``dac-fast serve --ray``: deploy on the Ray found from ``--ray [ADDRESS]``, print where the proxy listens,
    serve until SIGINT/SIGTERM (also during the deployment), then delete the application (and stop a Ray
    started here). A ``UserError`` when no Ray answers at ADDRESS or the replicas cannot start."""
    from ..arguments import UserError
    from ..distributed.cluster import connect, default_gpus
    from ..io import require

    serve = require("ray.serve", "dac-fast serve --ray")
    started = False
    try:
        try:
            started = connect(args.ray or None, "dac-fast serve --ray")
        except ConnectionError as exc:
            raise UserError(str(exc), "ray") from None
        # SIGTERM stops it as Ctrl-C does; set after connecting, which installs Ray's own (aborting) handler
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        gpus = default_gpus() if args.replica_gpus is None else args.replica_gpus
        application = ray_application(
            args.model, device=args.device, seed=args.seed, threads=args.threads,
            scheduler_options=scheduler_options, app_options=app_options, num_replicas=args.replicas,
            num_cpus=args.replica_cpus, num_gpus=gpus)
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(application, name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # the replicas did not start: e.g. the model cannot be loaded on a node
            raise UserError(f"the Ray Serve deployment failed (its replicas' logs say more): {exc}") from None
        print(f"dac-fast serve: listening on http://{args.host}:{args.port} (Ray Serve: {args.replicas} "
              f"replica(s), {args.replica_cpus:g} CPU and {gpus:g} GPU each)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("dac-fast serve: stopping", flush=True)
    finally:
        _remove(serve, started)
    return 0


def _remove(serve, started: bool) -> None:
    """Delete our application only (other applications on the cluster keep running); Ray Serve lets each
    replica's streams end for its graceful_shutdown_timeout_s, then stops it."""
    import ray

    if ray.is_initialized():
        try:
            serve.delete(APP_NAME)
        except Exception as exc:  # the cluster may already be gone: nothing left to delete
            print(f"dac-fast serve: could not delete the Ray Serve application: {exc}", flush=True)
    if started:
        ray.shutdown()
