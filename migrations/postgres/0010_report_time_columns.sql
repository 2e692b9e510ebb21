-- Every time column of a reporting view has its RFC 3339 UTC partner, as
-- the others do: alert_history gains acked_utc, command_log sent_utc,
-- finished_utc and expires_utc. `ingest report`'s table shows a
-- *_unix_nano column as its *_utc partner; these four had none, so the
-- table showed names the view did not have (issue 25). Each new column
-- sits beside its *_unix_nano column; the views are recreated for that.

DROP VIEW alert_history;
DROP VIEW command_log;

CREATE VIEW alert_history AS
SELECT a.alert_id                                                          AS alert_id,
       a.rule_id                                                           AS rule_id,
       d.device_id                                                         AS device_id,
       a.sensor                                                            AS sensor,
       a.severity                                                          AS severity,
       CASE WHEN a.resolved_unix_nano IS NOT NULL THEN 'resolved'
            WHEN a.acked_unix_nano IS NOT NULL THEN 'acked'
            ELSE 'open' END                                                AS state,
       a.fired_unix_nano                                                   AS fired_unix_nano,
       to_char(to_timestamp(a.fired_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS fired_utc,
       a.fired_value                                                       AS fired_value,
       a.acked_unix_nano                                                   AS acked_unix_nano,
       to_char(to_timestamp(a.acked_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS acked_utc,
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
       to_char(to_timestamp(c.sent_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS sent_utc,
       c.finished_unix_nano                                                AS finished_unix_nano,
       to_char(to_timestamp(c.finished_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS finished_utc,
       c.expires_unix_nano                                                 AS expires_unix_nano,
       to_char(to_timestamp(c.expires_unix_nano / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS expires_utc,
       ((c.sent_unix_nano - c.created_unix_nano) / 1e9)::double precision             AS seconds_to_delivery,
       CASE WHEN c.state IN ('acked', 'failed')
            THEN ((c.finished_unix_nano - c.created_unix_nano) / 1e9)::double precision END AS seconds_to_ack
FROM commands c
JOIN devices d ON d.pk = c.device_pk;
