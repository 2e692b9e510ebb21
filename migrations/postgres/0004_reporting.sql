-- Reporting: readings partitioned by day, incremental rollups and the public
-- reporting views.
--
-- Public (stable for SQL reporting; documented in docs/schema.md): the views
-- readings_hourly, readings_daily, latest_readings, device_status,
-- alert_history and command_log. They have the same names, columns, column
-- order and value types on SQLite and PostgreSQL, so a query written against
-- them runs unchanged on either.
-- Internal (may change without notice): readings_hourly_rollup; read it
-- through the views.

-- readings becomes partitioned by the reading's time, one partition per UTC
-- day named readings_pYYYYMMDD, so that retention drops whole days instead
-- of deleting rows. The server creates partitions ahead of time and on
-- demand; there is no default partition, so every stored reading sits in
-- the partition of its day. Queries on readings are unchanged.
--
-- sensor_pk has no foreign key any more: checking it costs a lookup in
-- sensors (with a row lock) for every reading inserted, which a profile at
-- full ingest showed as half the database's time. The writer is the only
-- one to insert readings, with pks it took from sensors in the same
-- transaction, and sensors are never deleted. The column still means
-- sensors.pk (docs/schema.md).
ALTER TABLE readings RENAME TO readings_unpartitioned;
ALTER INDEX readings_sensor_time RENAME TO readings_unpartitioned_sensor_time;

CREATE TABLE readings (
    sensor_pk      BIGINT           NOT NULL,
    -- When the reading was taken, by the device's clock.
    time_unix_nano BIGINT           NOT NULL,
    value          DOUBLE PRECISION NOT NULL
) PARTITION BY RANGE (time_unix_nano);

CREATE INDEX readings_sensor_time ON readings (sensor_pk, time_unix_nano);

DO $$
DECLARE
    day BIGINT;
BEGIN
    FOR day IN
        SELECT DISTINCT floor(time_unix_nano::numeric / 86400000000000)::bigint
        FROM readings_unpartitioned
    LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF readings FOR VALUES FROM (%s) TO (%s)',
            'readings_p' || to_char(to_timestamp(day * 86400) AT TIME ZONE 'UTC', 'YYYYMMDD'),
            day * 86400000000000,
            (day + 1) * 86400000000000);
    END LOOP;
END
$$;

INSERT INTO readings (sensor_pk, time_unix_nano, value)
SELECT sensor_pk, time_unix_nano, value FROM readings_unpartitioned;

DROP TABLE readings_unpartitioned;

-- One row per sensor and hour (UTC, by the reading's own time), kept up to
-- date by the writer in the same transaction as the readings it sums, so it
-- always agrees with what is committed. Raw readings age out (--retention);
-- rollups are kept longer (--rollup-retention).
CREATE TABLE readings_hourly_rollup (
    sensor_pk           BIGINT  NOT NULL REFERENCES sensors (pk),
    hour_unix_nano      BIGINT  NOT NULL,
    reading_count       BIGINT  NOT NULL,
    value_sum           DOUBLE PRECISION NOT NULL,
    value_min           DOUBLE PRECISION NOT NULL,
    value_max           DOUBLE PRECISION NOT NULL,
    -- The newest reading of the hour (by its time; on a tie, the last
    -- committed), so latest_readings needs no scan of raw readings.
    last_time_unix_nano BIGINT  NOT NULL,
    last_value          DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (sensor_pk, hour_unix_nano)
);

CREATE INDEX readings_hourly_rollup_by_hour ON readings_hourly_rollup (hour_unix_nano);

-- Readings stored before this migration are summed once here (on a tie
-- for the newest time, the larger value counts as the last).
INSERT INTO readings_hourly_rollup
SELECT sensor_pk, hour, COUNT(*), SUM(value), MIN(value), MAX(value), MAX(time_unix_nano), 0
FROM (SELECT sensor_pk, time_unix_nano, value,
             time_unix_nano - (((time_unix_nano % 3600000000000) + 3600000000000) % 3600000000000) AS hour
      FROM readings) AS g
GROUP BY sensor_pk, hour;

UPDATE readings_hourly_rollup
SET last_value = (SELECT MAX(r.value) FROM readings r
                  WHERE r.sensor_pk = readings_hourly_rollup.sensor_pk
                    AND r.time_unix_nano = readings_hourly_rollup.last_time_unix_nano);

-- device_status counts open alerts per device.
CREATE INDEX alerts_open_by_device ON alerts (device_pk) WHERE resolved_unix_nano IS NULL;

CREATE VIEW readings_hourly AS
SELECT d.device_id                                                         AS device_id,
       s.sensor                                                            AS sensor,
       s.unit                                                              AS unit,
       r.hour_unix_nano                                                    AS hour_unix_nano,
       to_char(to_timestamp(r.hour_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS hour_utc,
       r.reading_count                                                     AS reading_count,
       r.value_min                                                         AS min_value,
       r.value_max                                                         AS max_value,
       r.value_sum / r.reading_count                                       AS avg_value
FROM readings_hourly_rollup r
JOIN sensors s ON s.pk = r.sensor_pk
JOIN devices d ON d.pk = s.device_pk;

CREATE VIEW readings_daily AS
SELECT d.device_id                                                         AS device_id,
       s.sensor                                                            AS sensor,
       s.unit                                                              AS unit,
       r.day_unix_nano                                                     AS day_unix_nano,
       to_char(to_timestamp(r.day_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')     AS day_utc,
       r.reading_count                                                     AS reading_count,
       r.value_min                                                         AS min_value,
       r.value_max                                                         AS max_value,
       r.value_sum / r.reading_count                                       AS avg_value
FROM (SELECT sensor_pk,
             hour_unix_nano - (((hour_unix_nano % 86400000000000) + 86400000000000) % 86400000000000) AS day_unix_nano,
             SUM(reading_count)::bigint AS reading_count,
             SUM(value_sum)     AS value_sum,
             MIN(value_min)     AS value_min,
             MAX(value_max)     AS value_max
      FROM readings_hourly_rollup
      GROUP BY 1, 2) r
JOIN sensors s ON s.pk = r.sensor_pk
JOIN devices d ON d.pk = s.device_pk;

CREATE VIEW latest_readings AS
SELECT d.device_id                                                         AS device_id,
       s.sensor                                                            AS sensor,
       s.unit                                                              AS unit,
       r.last_time_unix_nano                                               AS time_unix_nano,
       to_char(to_timestamp(r.last_time_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS time_utc,
       r.last_value                                                        AS value
FROM sensors s
JOIN devices d ON d.pk = s.device_pk
JOIN readings_hourly_rollup r
  ON r.sensor_pk = s.pk
 AND r.hour_unix_nano = (SELECT MAX(m.hour_unix_nano) FROM readings_hourly_rollup m WHERE m.sensor_pk = s.pk);

CREATE VIEW device_status AS
SELECT d.device_id                                                         AS device_id,
       d.display_name                                                      AS display_name,
       CAST(CASE WHEN d.online THEN 1 ELSE 0 END AS BIGINT)                               AS online,
       d.firmware_version                                                  AS firmware_version,
       d.last_seen_unix_nano                                               AS last_seen_unix_nano,
       to_char(to_timestamp(d.last_seen_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS last_seen_utc,
       d.last_upload_unix_nano                                             AS last_upload_unix_nano,
       to_char(to_timestamp(d.last_upload_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS last_upload_utc,
       ((n.now_unix_nano - d.last_upload_unix_nano) / 1e9)::double precision          AS seconds_since_last_upload,
       COALESCE((SELECT SUM(r.reading_count)::bigint
                 FROM sensors s JOIN readings_hourly_rollup r ON r.sensor_pk = s.pk
                 WHERE s.device_pk = d.pk
                   AND r.hour_unix_nano >= n.now_unix_nano - (n.now_unix_nano % 3600000000000) - 82800000000000), 0)
                                                                           AS readings_24h,
       (SELECT COUNT(*) FROM alerts a
         WHERE a.device_pk = d.pk AND a.resolved_unix_nano IS NULL)        AS open_alerts
FROM devices d
CROSS JOIN (SELECT (floor(extract(epoch FROM now())) * 1000000000)::bigint AS now_unix_nano) n;

CREATE VIEW alert_history AS
SELECT a.alert_id                                                          AS alert_id,
       a.rule_id                                                           AS rule_id,
       d.device_id                                                         AS device_id,
       a.sensor                                                            AS sensor,
       a.severity                                                          AS severity,
       CASE WHEN a.resolved_unix_nano IS NOT NULL THEN 'resolved'
            WHEN a.acked_unix_nano IS NOT NULL THEN 'acknowledged'
            ELSE 'open' END                                                AS state,
       a.fired_unix_nano                                                   AS fired_unix_nano,
       to_char(to_timestamp(a.fired_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS fired_utc,
       a.fired_value                                                       AS fired_value,
       a.acked_unix_nano                                                   AS acked_unix_nano,
       a.resolved_unix_nano                                                AS resolved_unix_nano,
       to_char(to_timestamp(a.resolved_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS resolved_utc,
       a.resolved_value                                                    AS resolved_value,
       ((a.acked_unix_nano - a.fired_unix_nano) / 1e9)::double precision              AS seconds_to_ack,
       ((a.resolved_unix_nano - a.fired_unix_nano) / 1e9)::double precision           AS seconds_to_resolve,
       a.message                                                           AS message
FROM alerts a
JOIN devices d ON d.pk = a.device_pk;

CREATE VIEW command_log AS
SELECT c.command_id                                                        AS command_id,
       d.device_id                                                         AS device_id,
       c.kind                                                              AS kind,
       c.arguments                                                         AS arguments,
       c.state                                                             AS state,
       c.result                                                            AS result,
       c.created_unix_nano                                                 AS created_unix_nano,
       to_char(to_timestamp(c.created_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS created_utc,
       c.sent_unix_nano                                                    AS sent_unix_nano,
       c.finished_unix_nano                                                AS finished_unix_nano,
       c.expires_unix_nano                                                 AS expires_unix_nano,
       ((c.sent_unix_nano - c.created_unix_nano) / 1e9)::double precision             AS seconds_to_delivery,
       CASE WHEN c.state IN ('acked', 'failed')
            THEN ((c.finished_unix_nano - c.created_unix_nano) / 1e9)::double precision END AS seconds_to_ack
FROM commands c
JOIN devices d ON d.pk = c.device_pk;
