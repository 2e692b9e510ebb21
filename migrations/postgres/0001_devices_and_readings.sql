-- Devices, their sensors and their readings.
--
-- Public (stable for SQL reporting; see README "SQL reporting"):
--   devices:  device_id, display_name, labels, created_unix_nano,
--             committed_sequence, last_upload_unix_nano
--   sensors:  pk, device_pk, sensor, unit
--   readings: sensor_pk, time_unix_nano, value
-- Internal (may change without notice): devices.pk values, devices.token_sha256.
--
-- Conventions, identical on SQLite and PostgreSQL: times are unix epoch
-- nanoseconds (UTC) in 64-bit integers; labels are a JSON object of strings.

CREATE TABLE devices (
    pk                    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id             TEXT   NOT NULL UNIQUE,
    display_name          TEXT   NOT NULL,
    labels                JSONB  NOT NULL DEFAULT '{}',
    -- SHA-256 of the device's bearer token; the token itself is never stored.
    token_sha256          BYTEA  NOT NULL UNIQUE,
    created_unix_nano     BIGINT NOT NULL,
    -- Upload high-water mark: every batch with a sequence at or below it is
    -- stored. Updated in the same transaction as the readings.
    committed_sequence    BIGINT NOT NULL DEFAULT 0,
    -- When the device's last batch was committed; NULL if never.
    last_upload_unix_nano BIGINT
);

-- One row per (device, sensor name, unit): readings refer to it by pk, so the
-- sensor name is stored once, not once per reading.
CREATE TABLE sensors (
    pk        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_pk BIGINT NOT NULL REFERENCES devices (pk),
    sensor    TEXT   NOT NULL,
    -- Empty when the device sent no unit.
    unit      TEXT   NOT NULL DEFAULT '',
    UNIQUE (device_pk, sensor, unit)
);

CREATE TABLE readings (
    sensor_pk      BIGINT           NOT NULL REFERENCES sensors (pk),
    -- When the reading was taken, by the device's clock.
    time_unix_nano BIGINT           NOT NULL,
    value          DOUBLE PRECISION NOT NULL
);

CREATE INDEX readings_sensor_time ON readings (sensor_pk, time_unix_nano);
