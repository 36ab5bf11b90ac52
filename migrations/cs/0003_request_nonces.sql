-- The nonces of accepted signed requests, shared by every CS instance on this database,
-- so a request replayed to another instance behind the same load balancer is refused
-- too. A row is kept until `expires_at` (Unix seconds), past which the request's
-- timestamp is outside every instance's clock window; expired rows are deleted as new
-- ones arrive.
CREATE TABLE request_nonces (
    nonce TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);

CREATE INDEX request_nonces_expires_at ON request_nonces (expires_at);
