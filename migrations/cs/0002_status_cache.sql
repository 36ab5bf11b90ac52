-- What lets a configuration server keep the status it last read and re-read only what
-- changed, also when several CS instances share this database:
-- `generations.machines` is bumped by every transaction that changes a row of
-- `machines`; `process_servers.heartbeats` counts a server's heartbeats, so a stored
-- report is parsed again only after a new one.
CREATE TABLE generations (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);

INSERT INTO generations (name, value) VALUES ('machines', 0);

ALTER TABLE process_servers ADD COLUMN heartbeats BIGINT NOT NULL DEFAULT 0;
