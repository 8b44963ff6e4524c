-- API keys: only the SHA-256 of each secret is kept, never the secret.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    secret_hash TEXT NOT NULL UNIQUE,
    secret_prefix TEXT NOT NULL,
    tenant TEXT,
    is_admin BIGINT NOT NULL DEFAULT 0,
    rpm BIGINT,
    tpm BIGINT,
    max_concurrent BIGINT,
    tokens_per_day BIGINT,
    tokens_per_month BIGINT,
    models TEXT,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    updated_at BIGINT NOT NULL
);

-- One row per request; times in milliseconds since the Unix epoch.
CREATE TABLE usage_records (
    time_ms BIGINT NOT NULL,
    key_id TEXT,
    model TEXT,
    endpoint TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    status BIGINT NOT NULL,
    ttft_ms DOUBLE PRECISION,
    latency_ms DOUBLE PRECISION NOT NULL,
    disconnected BIGINT NOT NULL,
    replica TEXT NOT NULL
);
CREATE INDEX usage_records_key_time ON usage_records (key_id, time_ms);
CREATE INDEX usage_records_time ON usage_records (time_ms);

-- Requests admitted and tokens used per key, for the minute windows that replicas share
-- (--shared-limits); rows older than two minutes are pruned.
CREATE TABLE rate_events (
    key_id TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    tokens BIGINT NOT NULL
);
CREATE INDEX rate_events_key_time ON rate_events (key_id, time_ms);
