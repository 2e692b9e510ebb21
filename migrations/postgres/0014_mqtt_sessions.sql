-- MQTT sessions that outlive their connection (3.1.1 with Clean Session 0,
-- v5 with a Session Expiry Interval above 0). A client that reconnects
-- without a clean start, even after the server restarted, gets Session
-- Present 1 and its subscription back; otherwise MQTT 5 has it discard the
-- messages it had not had acknowledged.
--
-- Internal: not part of the reporting interface.

CREATE TABLE mqtt_sessions (
    device_pk           BIGINT PRIMARY KEY REFERENCES devices (pk),
    -- Subscribed to devices/{id}/commands/+.
    commands_subscribed BOOLEAN NOT NULL,
    -- When the session ends unless the device reconnects; NULL: never
    -- (3.1.1, or v5's 0xFFFFFFFF). Written at connect, so a session cut by
    -- a crash expires one interval after it; a session not kept past its
    -- connection has expired already.
    expires_unix_nano   BIGINT,
    -- The connection that wrote the row: a late write of an older
    -- connection of the device never overwrites a newer one's.
    connected_unix_nano BIGINT NOT NULL
);
