-- device_status: seconds_since_last_upload is NULL for a device that has
-- never uploaded, as docs/schema.md promises and SQLite gives. GREATEST
-- ignores NULL arguments, so GREATEST(now - NULL, 0) was 0, and the
-- "devices gone silent" query listed such a device as heard from just now.
--
-- CREATE OR REPLACE rather than DROP and CREATE: same columns, types and
-- order as 0006, and views users built on device_status stay in place.
--
-- Public: device_status, same columns and types as before.

CREATE OR REPLACE VIEW device_status AS
SELECT d.device_id                                                         AS device_id,
       d.display_name                                                      AS display_name,
       CAST(CASE WHEN d.online THEN 1 ELSE 0 END AS BIGINT)                               AS online,
       d.firmware_version                                                  AS firmware_version,
       d.last_seen_unix_nano                                               AS last_seen_unix_nano,
       to_char(to_timestamp(d.last_seen_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS last_seen_utc,
       d.last_upload_unix_nano                                             AS last_upload_unix_nano,
       to_char(to_timestamp(d.last_upload_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS last_upload_utc,
       (CASE WHEN d.last_upload_unix_nano IS NULL THEN NULL
             ELSE GREATEST(n.now_unix_nano - d.last_upload_unix_nano, 0) END / 1e9)::double precision
                                                                           AS seconds_since_last_upload,
       COALESCE((SELECT SUM(r.reading_count)::bigint
                 FROM sensors s JOIN readings_hourly_rollup r ON r.sensor_pk = s.pk
                 WHERE s.device_pk = d.pk
                   AND r.hour_unix_nano >= n.now_unix_nano - (n.now_unix_nano % 3600000000000) - 82800000000000), 0)
                                                                           AS readings_24h,
       (SELECT COUNT(*) FROM alerts a
         WHERE a.device_pk = d.pk AND a.resolved_unix_nano IS NULL)        AS open_alerts
FROM devices d
CROSS JOIN (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint * 1000 AS now_unix_nano) n;
