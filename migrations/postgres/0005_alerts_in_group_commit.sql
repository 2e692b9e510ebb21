-- Alert events are written in the same transaction as the readings that
-- cause them, and their ids are handed out by one counter row.
--
-- Public: nothing new; alert_events.event_id keeps its meaning (the
-- WatchAlerts cursor), now also gap-free. Internal: alert_event_counter,
-- alert_pending.

-- event_id was an identity column: two transactions could take ids 7 and 8
-- and commit 8 first, so a watcher reading "after 7" could skip 8's
-- neighbour for good, and a rolled-back transaction left a hole. Ids now
-- come from this row, whose lock every writer of events holds until it
-- commits: ids become visible in order, and a rollback gives them back.
CREATE TABLE alert_event_counter (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    last_id   BIGINT  NOT NULL
);
INSERT INTO alert_event_counter (last_id) SELECT COALESCE(MAX(event_id), 0) FROM alert_events;
ALTER TABLE alert_events ALTER COLUMN event_id DROP IDENTITY;

-- A threshold rule with a hold time remembers since when a device's value
-- has been past the fire value. Kept beside the readings, written only when
-- that changes, so a restart (or another server process) judges the next
-- reading as if nothing had happened.
CREATE TABLE alert_pending (
    rule_id         TEXT   NOT NULL,
    device_pk       BIGINT NOT NULL REFERENCES devices (pk),
    since_unix_nano BIGINT NOT NULL,
    PRIMARY KEY (device_pk, rule_id)
);

