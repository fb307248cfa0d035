"""Joining Ray, shared by ``dac-fast encode --ray`` and ``dac-fast serve --ray``: the address rules, the
runtime_env that lets workers import dac_fast, and one GPU per worker by default where the cluster has GPUs.
Imports ray only inside its functions, and never pyarrow."""

from __future__ import annotations

import os
from pathlib import Path

from .. import io as aio


ADDRESS_HELP = ("No ADDRESS: Ray's default (RAY_ADDRESS, else the cluster this node joined with `ray start`, else "
                "a new local Ray); 'auto': require a running cluster; 'local': always a new local Ray; or "
                "ray://HOST:10001")


def add_address_argument(group, what: str, then: str = "") -> None:
    """``--ray [ADDRESS]`` (None when absent, "" without ADDRESS) with ``what`` it does and the address rules."""
    group.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help=f"{what}. {ADDRESS_HELP}{'. ' + then if then else ''}")


def worker_runtime_env(runtime_env: dict | None = None, local: bool = True) -> dict:
    """A runtime_env that lets Ray workers import dac_fast.

    If dac_fast is installed as a distribution (``pip install .[ray]`` on every node) nothing is
    added. Otherwise a local Ray gets ``PYTHONPATH`` pointing at this checkout and a remote
    cluster gets ``py_modules=[dac_fast]`` (the package is uploaded; its compiled extension
    must match the workers' platform).
    """
    env = dict(runtime_env or {})
    try:
        from importlib.metadata import distribution

        distribution("dac_fast")
        return env
    except Exception:
        pass
    pkg = Path(__file__).resolve().parents[1]  # the dac_fast package
    if local:
        ev = dict(env.get("env_vars", {}))
        ev["PYTHONPATH"] = os.pathsep.join(p for p in (str(pkg.parent), os.environ.get("PYTHONPATH", "")) if p)
        env["env_vars"] = ev
    else:
        env.setdefault("py_modules", [str(pkg)])
    return env


def connect(address: str | None, purpose: str) -> bool:
    """Connect this process to Ray unless it already is. ``address`` None: Ray's default lookup (RAY_ADDRESS,
    else the cluster this node joined, else a new local Ray); 'auto': a running cluster; 'local': a new local
    Ray; ray://HOST:10001: Ray Client. Returns whether Ray was initialized here (the caller then shuts it
    down); a ConnectionError whose message says how to start a cluster when none answers."""
    ray = aio.require("ray", purpose)
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, runtime_env=worker_runtime_env(None, local=address in (None, "local")),
                 include_dashboard=False, log_to_driver=False)
    except ConnectionError as exc:
        raise ConnectionError(f"cannot connect to Ray at {address or ''!r} ({exc}); start a cluster with "
                              "`ray start --head` or use --ray local") from None
    return True


def default_gpus() -> int:
    """GPUs per worker when the user names none: 1 where the cluster has GPUs, else 0 (CPU workers)."""
    import ray

    return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
