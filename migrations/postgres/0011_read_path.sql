-- The read path (QueryReadings).
--
-- The hourly rollup gains the hour's first reading, so buckets of whole
-- hours can answer FIRST as they answer LAST. Ties of times are broken by
-- value, the same way everywhere the read path orders readings: the first
-- is the smallest (time, value), the last the largest.
ALTER TABLE readings_hourly_rollup ADD COLUMN first_time_unix_nano BIGINT;
ALTER TABLE readings_hourly_rollup ADD COLUMN first_value DOUBLE PRECISION;

-- Rows written before this migration: filled from the raw readings where
-- every reading the row counts is still stored. Where retention removed
-- some, first stays NULL and the read path answers FIRST from raw readings.
UPDATE readings_hourly_rollup
SET first_time_unix_nano = (
    SELECT MIN(r.time_unix_nano) FROM readings r
    WHERE r.sensor_pk = readings_hourly_rollup.sensor_pk
      AND r.time_unix_nano >= readings_hourly_rollup.hour_unix_nano
      AND r.time_unix_nano < readings_hourly_rollup.hour_unix_nano + 3600000000000)
WHERE reading_count = (
    SELECT COUNT(*) FROM readings r
    WHERE r.sensor_pk = readings_hourly_rollup.sensor_pk
      AND r.time_unix_nano >= readings_hourly_rollup.hour_unix_nano
      AND r.time_unix_nano < readings_hourly_rollup.hour_unix_nano + 3600000000000);

UPDATE readings_hourly_rollup
SET first_value = (
    SELECT MIN(r.value) FROM readings r
    WHERE r.sensor_pk = readings_hourly_rollup.sensor_pk
      AND r.time_unix_nano = readings_hourly_rollup.first_time_unix_nano)
WHERE first_time_unix_nano IS NOT NULL;

-- Secrets of the server processes sharing this database, created once by
-- the first that needs one: the key that MACs resume tokens, so every
-- process accepts the tokens of the others.
CREATE TABLE server_secrets (
    name              TEXT    PRIMARY KEY,
    secret            BYTEA   NOT NULL,
    created_unix_nano BIGINT  NOT NULL
);
