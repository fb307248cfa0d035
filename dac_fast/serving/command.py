"""``dac-fast serve``: its arguments (no torch import, for ``--help``) and the run."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_serve_parser(sub) -> None:
    from ..distributed.cluster import add_address_argument
    from ..job_model import PRESET_NAMES

    p = sub.add_parser(
        "serve", help="serve exact streaming encode/decode over WebSockets and HTTP",
        description="Serve one model to many clients: WebSocket streams (/v1/decode, /v1/encode) batched through "
                    "fixed slots, whole-file POST /v1/encode and /v1/decode, /healthz and /metrics. Binds "
                    "127.0.0.1 unless --host says otherwise; a non-local host needs --token or --insecure.")
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="local model directory, original .pth checkpoint or hub id; a preset name ("
                        + "|".join(PRESET_NAMES) + ") with --random-weights")
    p.add_argument("--random-weights", action="store_true", help="allow a preset --model (seeded RANDOM weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --random-weights model (default: 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--slots", type=int, default=8, metavar="N", help="decode streams at once (default: 8)")
    p.add_argument("--encode-slots", type=int, default=4, metavar="N", help="encode streams at once (default: 4)")
    p.add_argument("--queue", type=int, default=8, metavar="N",
                   help="streams waiting for a slot before new ones are refused with 1013 (default: 8)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--token", default=None, help="bearer token every connection must present")
    p.add_argument("--insecure", action="store_true", help="allow a non-local --host without --token")
    p.add_argument("--max-message-bytes", type=int, default=1 << 20, metavar="N",
                   help="largest WebSocket message (default: 1 MiB)")
    p.add_argument("--max-stream-seconds", type=float, default=3600.0, metavar="S",
                   help="longest stream, in seconds of audio (default: 3600)")
    p.add_argument("--outbox", type=int, default=32, metavar="N",
                   help="replies waiting for a slow client before it is dropped with 1008 (default: 32)")
    p.add_argument("--send-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a reply may wait for a client that does not read (default: 10)")
    p.add_argument("--decode-mode", choices=["slots", "per-stream", "windows"], default="slots",
                   help="decode streams: slots (default; exact, a tick's pushes in one batched step), per-stream "
                        "(exact, each push its own model call) or windows (Orpheus-style 28-frame windows per 7 "
                        "new frames, inexact at the seams); the last two are baselines for benchmarks")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA: steady decode ticks replay a graph recorded per slot count in use")
    p.add_argument("--coalesce", type=int, default=4, metavar="N",
                   help="a stream that fell behind has up to N queued pushes run as one (each still gets its own "
                        "reply; 1: never; default: 4)")
    p.add_argument("--gather-ms", type=float, default=5.0, metavar="MS",
                   help="how long a tick waits for the streams of the previous tick to push, so they share one "
                        "batched step (0: never waits; default: 5)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (per replica with --ray)")
    g = p.add_argument_group("Ray Serve: replicas across a cluster (pip install '.[serve-ray]')")
    add_address_argument(g, "serve as a Ray Serve deployment: each replica loads the model and runs its own slots; "
                            "Ray Serve's proxy listens on --host/--port on every node")
    g.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas (default: 1)")
    g.add_argument("--replica-cpus", type=float, default=1.0, metavar="C", help="CPUs per replica (default: 1)")
    g.add_argument("--replica-gpus", type=float, default=None, metavar="G",
                   help="GPUs per replica, fractions allowed (default: 1 if the cluster has GPUs, else 0)")


def fail(message: str) -> int:
    print(f"dac-fast serve: {message}", file=sys.stderr)
    return 2


def run_serve(args: argparse.Namespace) -> int:
    if args.host not in LOCAL_HOSTS and not args.token and not args.insecure:
        return fail(f"--host {args.host} is reachable from other machines: pass --token TOKEN (clients send "
                    "'Authorization: Bearer TOKEN') or --insecure to serve without one")
    for name in ("slots", "encode_slots"):
        if getattr(args, name) < 1:
            return fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if (args.queue < 0 or min(args.max_message_bytes, args.outbox) < 1 or min(args.max_stream_seconds,
                                                                             args.send_timeout) <= 0
            or not 0 <= args.port < 65536):
        return fail("--queue must be >= 0, --max-message-bytes, --outbox, --max-stream-seconds and "
                    "--send-timeout positive, --port in [0, 65535]")
    if args.coalesce < 1 or not 0 <= args.gather_ms <= 1000:
        return fail(f"--coalesce must be at least 1 (got {args.coalesce}) and --gather-ms in [0, 1000] "
                    f"(got {args.gather_ms:g})")
    from ..arguments import UserError
    from ..job_model import PRESET_NAMES, load_model
    from ..io import require

    if args.model in PRESET_NAMES and not args.random_weights:
        return fail(f"--model {args.model} is a preset with RANDOM weights: add --random-weights to use it")
    scheduler_options = dict(decode_slots=args.slots, encode_slots=args.encode_slots, waiting=args.queue,
                             decode_mode=args.decode_mode, cuda_graphs=args.cuda_graphs,
                             coalesce=args.coalesce, gather_s=args.gather_ms / 1000)
    app_options = dict(token=args.token, max_message_bytes=args.max_message_bytes,
                       max_stream_seconds=args.max_stream_seconds, outbox=args.outbox, send_timeout=args.send_timeout)
    if args.ray is not None:
        if args.replicas < 1 or args.replica_cpus < 0 or (args.replica_gpus or 0) < 0 or args.port == 0:
            return fail("with --ray, --replicas must be at least 1, --replica-cpus and --replica-gpus at least 0, "
                        "and --port a fixed port (Ray Serve's proxy binds it on every node)")
        from .ray_serve import serve_on_ray

        try:
            return serve_on_ray(args, scheduler_options, app_options)
        except UserError as exc:
            return fail(exc.for_cli())
    uvicorn = require("uvicorn", "dac-fast serve")
    import torch

    from .scheduler import Scheduler
    from .server import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = load_model(args.model, args.device, seed=args.seed, quiet=True)
    except UserError as exc:
        return fail(exc.for_cli())
    scheduler = Scheduler(model, **scheduler_options).start(thread=False)  # the model stays on this thread
    app = create_app(scheduler, **app_options)

    class DrainingServer(uvicorn.Server):
        """SIGTERM/SIGINT: stop accepting, let every stream finish its push in flight and close it with 1001,
        then uvicorn's own shutdown (which stops the scheduler)."""

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                port = self.servers[0].sockets[0].getsockname()[1]
                print(f"dac-fast serve: listening on http://{args.host}:{port}", flush=True)

        async def shutdown(self, sockets=None):
            for server in self.servers:
                server.close()
            await app.state.dac.drain()
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", ws="websockets-sansio",
                            ws_max_size=args.max_message_bytes + 1024, timeout_graceful_shutdown=30)
    server = DrainingServer(config)

    def web():
        try:
            server.run()
        finally:  # also when it could not start (port taken): the scheduler's loop below returns
            scheduler.stop(timeout=0)

    def on_signal(signum, frame):  # uvicorn off the main thread installs no handlers: ours ask it to drain
        server.force_exit = server.should_exit
        server.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    web_thread = threading.Thread(target=web, name="dac-fast-http", daemon=True)
    web_thread.start()
    scheduler.run_here()
    web_thread.join()
    if not server.started:
        return fail(f"could not serve on {args.host}:{args.port} (see the message above)")
    return 0
