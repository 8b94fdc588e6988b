"""Prometheus metrics (GET /metrics, prometheus-client's text format), in a registry of the app's own, so
several apps in one process never share or collide.

Fed at the one place each thing happens: every ended request's access Record (requests by route and status;
for speech that got a place, its total, first-audio, slot-wait seconds and real-time factor) and each engine
step (`Driver.on_step`: its seconds, and the audio its events carry, for requests and conversations alike).
Read at scrape time from their owners' own counts: the driver's and engine's (`Driver.stats`: slots, requests
waiting, failures, restarts, prefill rows, deferrals, warm-up), the open conversations and WebSockets.
"""

from __future__ import annotations

from typing import Iterable

from csm_jax.audio import SAMPLE_RATE
from csm_jax.driver import Driver
from csm_jax.server.access import Record

SPEECH_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)  # seconds taken per audio second


class Metrics:
    """The app's registry: `ended(record)` for each request, `step(seconds, events)` for each engine step,
    `render()` for a scrape -> (body, content type)."""

    def __init__(self, driver: Driver, conversations, in_flight: set[Record], routes: Iterable[str]):
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
        except ImportError as e:
            raise ImportError("the server's /metrics needs prometheus-client: pip install -e '.[serve]'") from e

        self.routes = frozenset(routes)
        self.registry = r = CollectorRegistry()
        self.requests = Counter("csm_requests", "Requests (WebSocket handshakes too) by route and status; 499: the "
                                "client left before the response was complete", ["route", "status"], registry=r)
        self.duration = Histogram("csm_speech_duration_seconds", "Speech requests that got a place: seconds from "
                                  "arrival to the end (last byte, error, or the client leaving)",
                                  buckets=SPEECH_BUCKETS, registry=r)
        self.first_audio = Histogram("csm_speech_first_audio_seconds", "Speech requests: seconds from arrival to "
                                     "the first audio", buckets=SPEECH_BUCKETS, registry=r)
        self.slot_wait = Histogram("csm_speech_slot_wait_seconds", "Speech requests: seconds from submission to a "
                                   "slot", buckets=SPEECH_BUCKETS, registry=r)
        self.rtf = Histogram("csm_speech_real_time_factor", "Complete speech requests: total seconds per second "
                             "of audio (below 1: faster than real time)", buckets=RTF_BUCKETS, registry=r)
        self.step_seconds = Histogram("csm_engine_step_seconds", "Seconds of each engine step (prefill, F frames "
                                      "and their decode, pipelined)", buckets=STEP_BUCKETS, registry=r)
        self.audio = Counter("csm_generated_audio_seconds", "Audio the engine generated, seconds (requests and "
                             "conversations)", registry=r)
        r.register(_Counts(driver, conversations, in_flight))
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...

    def ended(self, record: Record) -> None:
        route = record.route if record.route in self.routes else "other"
        self.requests.labels(route, str(record.status)).inc()
        if not record.admitted:
            return
        self.duration.observe(record.total_s)
        if record.first_audio_s is not None:
            self.first_audio.observe(record.first_audio_s)
        if record.slot_wait_s is not None:
            self.slot_wait.observe(record.slot_wait_s)
        if record.status == 200 and record.error is None and record.audio_s:
            self.rtf.observe(record.total_s / record.audio_s)

    def step(self, seconds: float, events: dict) -> None:  # from the driver's thread
        self.step_seconds.observe(seconds)
        self.audio.inc(sum(ev.audio.size for ev in events.values()) / SAMPLE_RATE)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Counts:
    """What the driver, the engine and the server's registries count, read at each scrape."""

    def __init__(self, driver: Driver, conversations, in_flight: set[Record]):
        self.driver, self.conversations, self.in_flight = driver, conversations, in_flight

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.driver.stats()
        busy = self.driver.engine.slots_in_use()
        sockets = sum(r.websocket and r.status == 101 for r in list(self.in_flight))
        warmup = s["warmup"]
        for name, help_text, value in [
                ("csm_slots", "Engine slots", s["slots"]),
                ("csm_slots_busy", "Slots in use: requests and held conversations", busy),
                ("csm_requests_waiting", "Requests with a place, waiting for a slot", s["queued"]),
                ("csm_warming", "1 while the programs are being compiled at start-up", int(self.driver.warming)),
                ("csm_warmup_programs", "Programs the warm-up compiles", warmup["programs"]),
                ("csm_warmup_programs_compiled", "Programs the warm-up has compiled", warmup["compiled"]),
                ("csm_conversations_open", "Conversations open", len(self.conversations.open)),
                ("csm_websocket_connections", "Conversation WebSockets connected", sockets)]:
            yield GaugeMetricFamily(name, help_text, value=value)
        for name, help_text, value in [
                ("csm_prefill_rows", "Prompt rows prefilled", s["prefill_rows"]),
                ("csm_deferred_admissions", "Steps that passed the oldest waiting prompt over for the running "
                 "streams' sake", s["deferred_admissions"]),
                ("csm_engine_failures", "Failed engine steps (and failed checks after a reset)",
                 s["engine_failures"]),
                ("csm_engine_restarts", "Engine resets checked good after a failure", s["engine_restarts"])]:
            yield CounterMetricFamily(name, help_text, value=value)
