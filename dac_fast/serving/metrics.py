"""The scheduler's metrics snapshot in the Prometheus text format (prometheus-client, the [serve] extra)."""

from __future__ import annotations


def render(snapshot: dict) -> tuple[bytes, str]:
    """``Scheduler.metrics()`` -> (body, content type) of a ``/metrics`` answer."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()

    def gauge(name: str, doc: str, labels=()):
        return Gauge(f"dac_fast_{name}", doc, labels, registry=registry)

    ticks = gauge("ticks_total", "scheduler ticks run")
    seconds = gauge("tick_seconds_total", "seconds spent in scheduler ticks")
    failed = gauge("failed_ticks_total", "batched steps that raised (their streams were closed)")
    refused = gauge("refused_total", "streams and requests refused as busy")
    most = gauge("most_tick_streams", "the most streams one tick advanced")
    slots = gauge("slots", "slots per lane", ["lane"])
    active = gauge("active_streams", "streams holding a slot", ["lane"])
    waiting = gauge("waiting_streams", "streams waiting for a slot", ["lane"])
    latency = gauge("stream_push_latency_seconds", "per-stream push latency (queued to answered)",
                    ["lane", "slot", "quantile"])
    ticks.set(snapshot["ticks"])
    seconds.set(snapshot["tick_seconds_total"])
    failed.set(snapshot["failed_ticks"])
    refused.set(snapshot["refused"])
    most.set(snapshot["most_tick_streams"])
    for lane, values in snapshot["lanes"].items():
        slots.labels(lane).set(values["slots"])
        active.labels(lane).set(values["active"])
        waiting.labels(lane).set(values["waiting"])
        for stream in values["streams"]:
            for quantile in ("0.5", "0.99"):
                value = stream[f"latency_p{quantile[2:].ljust(2, '0')}_s"]
                if value is not None:
                    latency.labels(lane, str(stream["slot"]), quantile).set(value)
    return generate_latest(registry), CONTENT_TYPE_LATEST
