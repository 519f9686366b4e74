"""Prometheus metrics of one server (its own registry, so several apps in one process stay apart)."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
GATE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))


class ServeMetrics:
    """Requests, tokens, latencies, batch sizes and routing (route counts, routing rate, gate p)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "prism_requests", "Chat completion requests by HTTP status", ["status"], registry=r
        )
        self.cancelled = Counter(
            "prism_requests_cancelled", "Requests ended early because their client went away", registry=r
        )
        self.refused = Counter(
            "prism_refused",
            "Requests refused or ended by a limit: unauthorized (401), body_too_large (413), "
            "nesting_too_deep (400), queue_full (429), timeout (504)",
            ["reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "prism_requests_in_flight", "Chat requests admitted and not yet fully answered", registry=r
        )
        self.prompt_tokens = Counter("prism_prompt_tokens", "Prompt tokens of answered requests", registry=r)
        self.completion_tokens = Counter("prism_completion_tokens", "Generated tokens", registry=r)
        self.latency = Histogram(
            "prism_request_latency_seconds",
            "Request arrival to last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "prism_time_to_first_token_seconds",
            "Request arrival to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "prism_queue_wait_seconds",
            "Request arrival to its prefill (joining the running batch)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "prism_batch_size",
            "Requests admitted together (rows per prefill)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.running = Gauge("prism_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("prism_requests_waiting", "Requests waiting for a batch", registry=r)
        self.routes = Counter(
            "prism_routes", "Answered requests by route and routing mode", ["route", "mode"], registry=r
        )
        self.routing_rate = Gauge(
            "prism_routing_rate", "Share of gate-decided requests routed to the adapter", registry=r
        )
        self.gate_probability = Histogram(
            "prism_gate_probability", "Gate probability of each request's first user turn",
            buckets=GATE_BUCKETS, registry=r,
        )  # fmt: skip
        self._gated = 0
        self._gated_on = 0

    def observe_route(self, mode: str, route: bool, gate_prob: float) -> None:
        self.routes.labels(route="adapter" if route else "base", mode=mode).inc()
        if not math.isnan(gate_prob):
            self.gate_probability.observe(gate_prob)
        if mode == "gated":
            self._gated += 1
            self._gated_on += route
            self.routing_rate.set(self._gated_on / self._gated)

    def render(self) -> bytes:
        return generate_latest(self.registry)
