-- The configuration server's state (src/control/cs/db.rs). Portable SQL only: it runs
-- on SQLite and PostgreSQL alike (TEXT and BIGINT; times are Unix milliseconds;
-- flags are 0/1; fractions are parts per million).

CREATE TABLE process_servers (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    cert_pem TEXT NOT NULL,
    version TEXT NOT NULL,
    cache_size_bytes BIGINT NOT NULL,
    registered_at BIGINT NOT NULL,
    last_heartbeat_at BIGINT NULL,
    -- The last heartbeat as JSON (api::Heartbeat), for status.
    report_json TEXT NULL,
    -- Placement inputs from the last heartbeat, as columns so that choosing a server
    -- does not parse every report.
    health TEXT NOT NULL DEFAULT 'ok',
    ingest_bytes_per_second BIGINT NOT NULL DEFAULT 0,
    cache_free_ppm BIGINT NOT NULL DEFAULT 1000000,
    decommissioning BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE machines (
    name TEXT PRIMARY KEY,
    -- Hex of 32 random bytes; NULL after an operator's reassign (the name is free).
    credential TEXT NULL,
    ps_id TEXT NULL,
    moving_to TEXT NULL,
    resync_pending BIGINT NOT NULL DEFAULT 0,
    registered_at BIGINT NOT NULL
);

CREATE INDEX machines_ps_id ON machines (ps_id);
CREATE INDEX machines_moving_to ON machines (moving_to);
