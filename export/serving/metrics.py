"""The service's Prometheus metrics (``GET /metrics``), in a registry of their own (one per service object).

| metric | labels | what |
|---|---|---|
| ``ocr_requests_total`` | variant, code | answered requests (variant ``none``: refused before routing) |
| ``ocr_request_seconds`` | variant | arrival to answer, queueing included |
| ``ocr_inference_seconds`` | variant, role | one model run (``primary`` answered, ``shadow`` compared) |
| ``ocr_in_flight_requests`` | | requests holding a processing slot |
| ``ocr_queue_depth`` | | admitted requests waiting for a slot |
| ``ocr_model_load_seconds`` | variant | time to load the variant's models |
| ``ocr_shadow_agreement`` | model | per shadow comparison (histogram), ``det`` / ``rec`` |
| ``ocr_shadow_agreement_window`` | model | mean over the guardrail window |
| ``ocr_shadow_total`` | outcome | shadow runs ``compared``, ``skipped`` (queue full), ``failed`` |
| ``ocr_guardrail_value`` | check | each guardrail's value over its window |
| ``ocr_rollbacks_total`` | reason | automatic (the failing check) and ``manual`` rollbacks |
| ``ocr_candidate_share`` | | the candidate's share now |
| ``process_resident_memory_bytes`` ... | | prometheus_client's process collector (RSS, CPU, fds) |
"""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
AGREEMENT_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ServiceMetrics:
    """Every metric of one service, registered in ``self.registry``."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        self.requests = Counter("ocr_requests", "Answered requests by variant and HTTP status code",
                                ["variant", "code"], registry=registry)
        self.request_seconds = Histogram("ocr_request_seconds", "Arrival to answer, queueing included",
                                         ["variant"], buckets=LATENCY_BUCKETS, registry=registry)
        self.inference_seconds = Histogram("ocr_inference_seconds", "One model run (det + rec) of a variant",
                                           ["variant", "role"], buckets=LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge("ocr_in_flight_requests", "Requests holding a processing slot", registry=registry)
        self.queue_depth = Gauge("ocr_queue_depth", "Admitted requests waiting for a processing slot",
                                 registry=registry)
        self.load_seconds = Gauge("ocr_model_load_seconds", "Time to load a variant's models", ["variant"],
                                  registry=registry)
        self.agreement = Histogram("ocr_shadow_agreement", "Agreement of the candidate's answer with the baseline's",
                                   ["model"], buckets=AGREEMENT_BUCKETS, registry=registry)
        self.agreement_window = Gauge("ocr_shadow_agreement_window", "Mean shadow agreement over the guardrail "
                                      "window", ["model"], registry=registry)
        self.shadow = Counter("ocr_shadow", "Shadow runs by outcome", ["outcome"], registry=registry)
        self.guardrail = Gauge("ocr_guardrail_value", "Each guardrail's value over its window", ["check"],
                               registry=registry)
        self.rollbacks = Counter("ocr_rollbacks", "Rollbacks of the candidate to share 0", ["reason"],
                                 registry=registry)
        self.share = Gauge("ocr_candidate_share", "The candidate's share of requests", registry=registry)

    def exposition(self):
        """The registry in Prometheus' text format (bytes)."""
        return generate_latest(self.registry)
