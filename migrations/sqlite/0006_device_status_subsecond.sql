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
       CAST(d.online AS INTEGER)                                           AS online,
       d.firmware_version                                                  AS firmware_version,
       d.last_seen_unix_nano                                               AS last_seen_unix_nano,
       strftime('%Y-%m-%dT%H:%M:%SZ', d.last_seen_unix_nano / 1000000000, 'unixepoch') AS last_seen_utc,
       d.last_upload_unix_nano                                             AS last_upload_unix_nano,
       strftime('%Y-%m-%dT%H:%M:%SZ', d.last_upload_unix_nano / 1000000000, 'unixepoch') AS last_upload_utc,
       MAX(n.now_unix_nano - d.last_upload_unix_nano, 0) / 1000000000.0   AS seconds_since_last_upload,
       COALESCE((SELECT SUM(r.reading_count)
                 FROM sensors s JOIN readings_hourly_rollup r ON r.sensor_pk = s.pk
                 WHERE s.device_pk = d.pk
                   AND r.hour_unix_nano >= n.now_unix_nano - (n.now_unix_nano % 3600000000000) - 82800000000000), 0)
                                                                           AS readings_24h,
       (SELECT COUNT(*) FROM alerts a
         WHERE a.device_pk = d.pk AND a.resolved_unix_nano IS NULL)        AS open_alerts
FROM devices d
-- julianday('now') carries milliseconds (unixepoch('subsec') would need
-- SQLite 3.42, newer than some shells people report with).
CROSS JOIN (SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) * 1000000 AS now_unix_nano) n;
