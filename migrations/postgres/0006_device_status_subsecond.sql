-- device_status: "now" with sub-second precision. Whole seconds made
-- seconds_since_last_upload about -0.1 within the second after an upload.
-- The upload time is taken on the server's clock just before its commit,
-- and "now" here is at most a millisecond coarse, so the difference is
-- clamped at zero rather than shown a hair below it.
--
-- Public: device_status, same columns and types as before.

DROP VIEW device_status;

CREATE VIEW device_status AS
SELECT d.device_id                                                         AS device_id,
       d.display_name                                                      AS display_name,
       CAST(CASE WHEN d.online THEN 1 ELSE 0 END AS BIGINT)                               AS online,
       d.firmware_version                                                  AS firmware_version,
       d.last_seen_unix_nano                                               AS last_seen_unix_nano,
       to_char(to_timestamp(d.last_seen_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS last_seen_utc,
       d.last_upload_unix_nano                                             AS last_upload_unix_nano,
       to_char(to_timestamp(d.last_upload_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS last_upload_utc,
       (GREATEST(n.now_unix_nano - d.last_upload_unix_nano, 0) / 1e9)::double precision AS seconds_since_last_upload,
       COALESCE((SELECT SUM(r.reading_count)::bigint
                 FROM sensors s JOIN readings_hourly_rollup r ON r.sensor_pk = s.pk
                 WHERE s.device_pk = d.pk
                   AND r.hour_unix_nano >= n.now_unix_nano - (n.now_unix_nano % 3600000000000) - 82800000000000), 0)
                                                                           AS readings_24h,
       (SELECT COUNT(*) FROM alerts a
         WHERE a.device_pk = d.pk AND a.resolved_unix_nano IS NULL)        AS open_alerts
FROM devices d
CROSS JOIN (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint * 1000 AS now_unix_nano) n;
