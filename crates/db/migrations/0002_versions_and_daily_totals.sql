-- One counter bumped in the same transaction as every key change: servers poll it.
CREATE TABLE key_version (
    id BIGINT PRIMARY KEY,
    v BIGINT NOT NULL
);
INSERT INTO key_version (id, v) VALUES (1, 0);

-- Tokens per key and UTC day (days since the Unix epoch), kept with the usage records in
-- one transaction: budgets read these few rows, not the day's records.
CREATE TABLE usage_daily (
    key_id TEXT NOT NULL,
    day BIGINT NOT NULL,
    tokens BIGINT NOT NULL,
    PRIMARY KEY (key_id, day)
);
INSERT INTO usage_daily (key_id, day, tokens)
SELECT key_id, CAST(time_ms / 86400000 AS BIGINT), CAST(SUM(prompt_tokens + completion_tokens) AS BIGINT)
FROM usage_records WHERE key_id IS NOT NULL
GROUP BY key_id, CAST(time_ms / 86400000 AS BIGINT);
