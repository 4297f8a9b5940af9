"""Prometheus metrics, with a ``profile`` label wherever a request or a swap belongs to one.

Each app owns its own ``CollectorRegistry`` (tests build many apps in one process).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("laser_requests", "HTTP requests by route, method, status and profile.",
                                ["route", "method", "status", "profile"], registry=r)
        self.request_seconds = Histogram("laser_request_duration_seconds", "End-to-end request latency.",
                                         ["route", "profile"], buckets=_LATENCY, registry=r)
        self.queue_seconds = Histogram("laser_queue_duration_seconds", "Time a request waited for the engine.",
                                       ["profile"], buckets=_LATENCY, registry=r)
        self.inference_seconds = Histogram("laser_inference_duration_seconds", "Time a request spent running in "
                                           "the engine (admission to result), or one task's time.",
                                           ["profile", "op"], buckets=_LATENCY, registry=r)
        self.ttft_seconds = Histogram("laser_time_to_first_token_seconds", "Time to the first generated token.",
                                      ["profile"], buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("laser_prompt_tokens", "Prompt tokens processed.", ["profile"], registry=r)
        self.generated_tokens = Counter("laser_generated_tokens", "Tokens generated.", ["profile"], registry=r)
        self.batch_size = Histogram("laser_batch_size", "Rows per engine step (op: decode rows, prefill rows; "
                                    "profile 'all': a step mixes profiles), or per task.", ["profile", "op"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.running_rows = Gauge("laser_running_rows", "Rows in the continuous batch (decoding or prefilling).",
                                  registry=r)
        self.kv_cache_bytes = Gauge("laser_kv_cache_bytes", "Bytes of the per-row KV cache.", registry=r)
        self.profile_factor_bytes = Gauge("laser_profile_factor_bytes",
                                          "Bytes of compiled per-row profile edits (factors).", registry=r)
        self.weight_bytes_written = Counter("laser_weight_bytes_written", "Bytes written into the model's "
                                            "weights (tasks only: serving profiles writes none).", registry=r)
        self.queue_depth = Gauge("laser_queue_depth", "Requests waiting for the engine.", registry=r)
        self.active_profile = Gauge("laser_active_profile", "1 for the profile whose weights are in the model's "
                                    "parameters (base while serving: profiles are served per row).",
                                    ["profile"], registry=r)
        self.edit_cache_bytes = Gauge("laser_edit_cache_bytes", "Bytes of cached edited weights.", registry=r)
        self.svd_cache_bytes = Gauge("laser_svd_cache_bytes", "Bytes of cached SVD factors.", registry=r)
        self.rejected = Counter("laser_rejected_requests", "Requests refused because the queue was full.",
                                ["profile"], registry=r)
        self.jobs = Gauge("laser_jobs", "Sweep jobs by state in the shared store (every replica reports the same "
                                        "counts: aggregate with max).", ["state"], registry=r)
        self.job_progress = Gauge("laser_job_progress_ratio", "Done/total of the sweep job this replica runs.", ["job"],
                                  registry=r)

    def set_active(self, profile: str | None, previous: str | None) -> None:
        if previous is not None:
            self.active_profile.labels(previous).set(0)
        if profile is not None:
            self.active_profile.labels(profile).set(1)
