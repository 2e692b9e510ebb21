-- Alert events are written in the same transaction as the readings that
-- cause them, and their ids are handed out by one counter row.
--
-- Public: nothing new; alert_events.event_id keeps its meaning (the
-- WatchAlerts cursor), now also gap-free. Internal: alert_event_counter,
-- alert_pending.

-- The same counter as on PostgreSQL, so both backends number events by one
-- code path. SQLite has one writer at a time, so order was never at risk.
CREATE TABLE alert_event_counter (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    last_id   INTEGER NOT NULL
);
INSERT INTO alert_event_counter (singleton, last_id) SELECT 1, COALESCE(MAX(event_id), 0) FROM alert_events;

-- A threshold rule with a hold time remembers since when a device's value
-- has been past the fire value. Kept beside the readings, written only when
-- that changes, so a restart judges the next reading as if nothing had
-- happened.
CREATE TABLE alert_pending (
    rule_id         TEXT    NOT NULL,
    device_pk       INTEGER NOT NULL REFERENCES devices (pk),
    since_unix_nano INTEGER NOT NULL,
    PRIMARY KEY (device_pk, rule_id)
);

