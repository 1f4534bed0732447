"""Prometheus metrics, all prefixed `bon_`, in base units, counters ending in `_total`.

They live in prometheus-client's default registry so they sit beside vLLM's (and the process
collectors) on one /metrics page. No name contains "vllm": vLLM unregisters such collectors.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
# Raw Bradley-Terry logits: unbounded and centred near zero, so buckets are symmetric.
_REWARD_BUCKETS = (-20, -10, -5, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 5, 10, 20)

REQUESTS = Counter("bon_requests", "HTTP requests answered.", ["route", "status"])
REQUEST_SECONDS = Histogram(
    "bon_request_duration_seconds", "Time from request to response.", ["route"], buckets=_LATENCY_BUCKETS
)
QUEUE_WAIT = Histogram(
    "bon_queue_wait_seconds", "Time a job waited for its batch.", ["stage"], buckets=_LATENCY_BUCKETS
)
STAGE_SECONDS = Histogram(
    "bon_batch_duration_seconds",
    "Time one engine call took: a scoring batch, or one step of the running sampling batch "
    "(requests joining it prefilled, then one token for every row).",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SEQUENCES = Histogram(
    "bon_batch_sequences",
    "Sequences in one scoring batch, or in the sampling batch as requests join it.",
    ["stage"],
    buckets=_SIZE_BUCKETS,
)
BATCH_TOKENS = Histogram(
    "bon_batch_tokens",
    "Token budget used by one scoring batch, or by the sampling batch as requests join it.",
    ["stage"],
    buckets=_TOKEN_BUCKETS,
)
DROPPED = Counter("bon_dropped_jobs", "Queued jobs dropped because their client went away.", ["stage"])
PROMPT_TOKENS = Counter("bon_prompt_tokens", "Prompt tokens processed (once per prompt).")
GENERATED_TOKENS = Counter("bon_generation_tokens", "Tokens generated over all candidates.")
PRUNED = Counter("bon_pruned_candidates", "Candidates that early rejection stopped at its decision point.")
CANDIDATES = Histogram(
    "bon_candidates_per_request", "Candidates sampled per prompt (best_of).", buckets=_SIZE_BUCKETS
)
# By policy version: a dashboard compares the reward a new checkpoint earns with its predecessor's.
CANDIDATE_REWARD = Histogram(
    "bon_candidate_reward", "Reward of every sampled candidate.", ["policy_version"], buckets=_REWARD_BUCKETS
)
MEMBER_REWARD = Histogram(
    "bon_member_reward",
    "Raw reward of every scored candidate, per reward member (reward model or rule) and its version.",
    ["member", "version"],
    buckets=_REWARD_BUCKETS,
)
RETURNED_REWARD = Histogram(
    "bon_returned_reward",
    "Reward of the candidates returned to clients.",
    ["policy_version"],
    buckets=_REWARD_BUCKETS,
)
RM_TRUNCATED = Counter(
    "bon_reward_input_truncated", "Candidates whose reward-model input was cut to fit its context."
)
LOG_QUEUE = Gauge("bon_sample_log_queue_records", "Candidate records waiting to be written.")
LOG_WRITTEN = Counter("bon_sample_log_records_written", "Candidate records committed.")
LOG_ERRORS = Counter("bon_sample_log_write_errors", "Candidate-log commits that failed (each is retried).")
LOG_HEALTHY = Gauge(
    "bon_sample_log_healthy", "1 while the candidate log commits; 0 while its commits fail (503 log_behind)."
)
LOG_LOST = Counter(
    "bon_sample_log_records_lost",
    "Candidate records never written: refused for their content, or still failing at shutdown.",
)
ENGINE_HEALTHY = Gauge(
    "bon_engine_healthy", "1 while both engines can serve; 0 once one has died (checked at every scrape)."
)
POLICY_PUBLISHED = Gauge(
    "bon_policy_published_timestamp_seconds",
    "When the served policy checkpoint was made: its RAFT manifest's time, else its directory's.",
)
MODEL_INFO = Gauge("bon_model_info", "The loaded model of each role (value 1).", ["role", "path", "version"])
RELOADS = Counter(
    "bon_model_reloads", "Checkpoint reloads by outcome (loaded or refused).", ["role", "outcome"]
)
