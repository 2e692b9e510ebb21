-- Device presence and the durable command queue.
--
-- Public (stable for SQL reporting): devices.online, devices.last_seen_unix_nano,
-- devices.firmware_version; commands (all columns).

-- True while the device holds a Control stream; every device is offline
-- when the server starts.
ALTER TABLE devices ADD COLUMN online BOOLEAN NOT NULL DEFAULT FALSE;
-- When the server last heard from the device on its Control stream.
ALTER TABLE devices ADD COLUMN last_seen_unix_nano INTEGER;
ALTER TABLE devices ADD COLUMN firmware_version TEXT;

CREATE TABLE commands (
    command_id         INTEGER PRIMARY KEY,
    device_pk          INTEGER NOT NULL REFERENCES devices (pk),
    -- set_sampling_interval, set_batch_size, set_sensor_enabled, reboot,
    -- ping or custom; arguments is a JSON object.
    kind               TEXT    NOT NULL,
    arguments          TEXT    NOT NULL,
    state              TEXT    NOT NULL CHECK (state IN ('queued', 'sent', 'acked', 'failed', 'expired')),
    -- The device's detail from its acknowledgement.
    result             TEXT    NOT NULL DEFAULT '',
    created_unix_nano  INTEGER NOT NULL,
    sent_unix_nano     INTEGER,
    finished_unix_nano INTEGER,
    expires_unix_nano  INTEGER NOT NULL
);

CREATE INDEX commands_by_device ON commands (device_pk, command_id);
CREATE INDEX commands_by_state ON commands (state, expires_unix_nano);
