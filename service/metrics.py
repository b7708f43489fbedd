"""The service's Prometheus metrics, defined once. Incremented where the event happens.

Plain prometheus_client: under `bentoml serve` every worker process has PROMETHEUS_MULTIPROC_DIR
set before this module is imported, so each value lives in a per-process file and BentoML's
/metrics sums them across workers. Labels never carry request data: `reason` takes the fixed
values in REASONS, and the model-info labels are fixed for the life of a process.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Why these buckets: on a CPU a batch of small images runs in ~10 ms to ~1 s and a large tiled
# image in seconds; on a GPU a batch takes ~1 ms. Iterations (steps per image, 1..max_steps; the served
# defaults 18 and 20, the paper's 100) and batch sizes are integers: their bounds sit at n +- 0.5 around the
# counts that should read exactly, so histogram_quantile's interpolation inside a bucket lands within 0.5 of
# the count (with bounds at 10 and 20, 18-step requests had read p95 19.5, batches of 1 read 0.95). Every
# step count to 30, the round ones above; batch sizes 1-4 and the powers of two. The energy is a sum over
# pixels, so it scales with the image size: decades with a midpoint cover untrained and trained models on
# native-size and tiled inputs.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITERATION_BUCKETS = (
    *(n + 0.5 for n in range(31)),
    *(b for n in (40, 50, 100, 200, 500, 1000) for b in (n - 0.5, n + 0.5)),
    2000.5,
)
BATCH_BUCKETS = (
    0.5,
    1.5,
    2.5,
    3.5,
    4.5,
    *(b for n in (8, 16, 32, 64, 128, 256, 512, 1024) for b in (n - 0.5, n + 0.5)),
)
ENERGY_BUCKETS = (0.1, 0.3, 1, 3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6)

# Every value the `reason` label can take (pre-created at 0 so rate() works from the first scrape).
REASONS = (
    "bad_request",  # not a multipart form, malformed form, unknown field
    "bad_http",  # not parseable as HTTP/1.1 (garbage or TLS, a bad Content-Length, broken chunks): 400, closed
    "missing_field",  # no image, or an empty body
    "bad_image",  # not an image, truncated, corrupt, a URL string instead of the file
    "too_small",  # a side below the minimum
    "too_large",  # body, pixels, tiles or images per request over the limit
    "unsupported_format",  # an image format the service does not take
    "bad_parameter",  # steps, size_mode or outputs out of range
    "not_finite",  # inference produced NaN or Inf (an unstable checkpoint)
    "overloaded",  # the model's queue is full
    "loading",  # the worker's model is still loading (503, retry): a worker starting or restarting
    "timeout",  # the request body did not arrive in time (408): a slow or stalled client
    "over_budget",  # a worker's memory budget (bodies or decoding in flight) is full: 503, retry
    "not_found",  # /v2: a model name or version this server does not serve (404)
    "header_too_large",  # a request head over PC_MAX_HEADER_BYTES or 100 fields (431)
    "disconnected",  # the client closed the connection before its request body arrived (no answer: 499 in the log)
    "internal",  # a bug: the service failed on a request (500; the traceback is in the log)
    "unauthorized",  # PC_API_KEY is set and the request has no key or another one (401; gRPC UNAUTHENTICATED)
)
BUDGETS = ("bodies", "decoding")  # service.budget: request bodies held, images being decoded

INFERENCE_DURATION = Histogram(
    "pc_inference_duration_seconds", "Model time per batch (model.infer).", buckets=DURATION_BUCKETS
)
INFERENCE_ITERATIONS = Histogram(
    "pc_inference_iterations",
    "Inference steps per encoded image (tiles of one image count once); _sum is the iteration count.",
    buckets=ITERATION_BUCKETS,
)
BATCH_SIZE = Histogram("pc_batch_size", "Images or tiles per model call.", buckets=BATCH_BUCKETS)
FINAL_ENERGY = Histogram(
    "pc_final_energy", "Energy per encoded image after the last step (sum over its tiles).", buckets=ENERGY_BUCKETS
)
IMAGES = Counter("pc_images", "Images encoded successfully.")  # exposed as pc_images_total
REQUEST_ERRORS = Counter(
    "pc_request_errors", "Rejected requests, or rejected images inside /encode_batch, by reason.", ["reason"]
)  # exposed as pc_request_errors_total{reason}
# One series per process with value 1; "max" merges the workers' identical series into one.
MODEL_INFO = Gauge(
    "pc_model_info",
    "The model this service runs (value 1).",
    ["name", "preset", "sha256", "device", "backend"],
    multiprocess_mode="max",
)

# The gRPC calls (BentoML's request metrics see HTTP only); method and code come from fixed sets.
GRPC_REQUESTS = Counter(
    "pc_grpc_requests", "Open Inference Protocol gRPC calls by method and status code.", ["method", "code"]
)  # exposed as pc_grpc_requests_total{method, code}
GRPC_DURATION = Histogram(
    "pc_grpc_request_duration_seconds", "Time per gRPC call.", ["method"], buckets=DURATION_BUCKETS
)

# The same for the Open Inference Protocol's REST routes, with the protocol's call names as `method` (ServerLive,
# ServerReady, ServerMetadata, ModelMetadata, ModelReady, ModelInfer) and the HTTP status as `code`. BentoML's
# request metrics label a request by its raw path, which holds the client's model name: the scrape's relabelling
# drops those series (unbounded), so these are where /v2 traffic shows. A request the middleware refuses first
# (413 before its body is read, 401, 408, 431) is not a call here; pc_request_errors_total counts it.
V2_REST_REQUESTS = Counter(
    "pc_v2_rest_requests", "Open Inference Protocol REST calls by method and HTTP status.", ["method", "code"]
)  # exposed as pc_v2_rest_requests_total{method, code}
V2_REST_DURATION = Histogram(
    "pc_v2_rest_request_duration_seconds",
    "Time per Open Inference Protocol REST call.",
    ["method"],
    buckets=DURATION_BUCKETS,
)

# Per process; "livesum" adds the live workers' values, so /metrics shows the service's totals.
INFLIGHT_BYTES = Gauge(
    "pc_inflight_bytes", "Bytes held now under each memory budget.", ["budget"], multiprocess_mode="livesum"
)
BUDGET_LIMIT = Gauge(
    "pc_budget_limit_bytes", "Capacity of each memory budget.", ["budget"], multiprocess_mode="livesum"
)

for _reason in REASONS:
    REQUEST_ERRORS.labels(reason=_reason)


def count_error(reason: str) -> None:
    """One rejected request (or image) for `reason`, which must be one of REASONS."""
    assert reason in REASONS, f"unknown error reason {reason!r}"
    REQUEST_ERRORS.labels(reason=reason).inc()
