-- Device credentials: up to a few bearer tokens per device, so a token can
-- be rotated with an overlap; a certificate bound to the device for mutual
-- TLS; and whether the device may connect at all.
--
-- Public (stable for SQL reporting): device_tokens.pk (the credential id the
--   API and CLI show), device_pk, created_unix_nano, last_used_unix_nano,
--   expires_unix_nano, revoked_unix_nano; devices.cert_sha256 (hex with
--   encode()/hex()), cert_bound_unix_nano, require_mtls, disabled_unix_nano.
-- Internal: device_tokens.token_sha256. devices.token_sha256 is no longer
--   read: it keeps the hash of the token issued at registration, because
--   SQLite cannot drop a UNIQUE column without rebuilding the table.

CREATE TABLE device_tokens (
    pk                  INTEGER PRIMARY KEY,
    device_pk           INTEGER NOT NULL REFERENCES devices (pk),
    -- SHA-256 of the bearer token; the token itself is never stored.
    token_sha256        BLOB NOT NULL UNIQUE,
    created_unix_nano   INTEGER NOT NULL,
    -- Recorded at most once a minute per token.
    last_used_unix_nano INTEGER,
    -- NULL: no expiry. Set when a rotation gives the old tokens an overlap.
    expires_unix_nano   INTEGER,
    revoked_unix_nano   INTEGER
);

CREATE INDEX device_tokens_device ON device_tokens (device_pk);

-- Every device so far had exactly one token, issued at registration.
INSERT INTO device_tokens (device_pk, token_sha256, created_unix_nano)
SELECT pk, token_sha256, created_unix_nano FROM devices;

-- SHA-256 of the DER certificate bound to the device; NULL when none.
ALTER TABLE devices ADD COLUMN cert_sha256 BLOB;
CREATE UNIQUE INDEX devices_cert_sha256 ON devices (cert_sha256);
ALTER TABLE devices ADD COLUMN cert_bound_unix_nano INTEGER;
-- A token alone is refused: the device must present its bound certificate.
ALTER TABLE devices ADD COLUMN require_mtls BOOLEAN NOT NULL DEFAULT FALSE;
-- Set while the device is disabled: every call of it is refused.
ALTER TABLE devices ADD COLUMN disabled_unix_nano INTEGER;
