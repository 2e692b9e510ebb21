-- Alert rules, alerts and the alert event log.
--
-- Public (stable for SQL reporting): alert_rules (rule_id, severity, sensor,
-- created_unix_nano, updated_unix_nano), alerts (all columns), alert_events
-- (all columns). Internal: alert_rules.definition (the rule as JSON; its
-- shape may change).

CREATE TABLE alert_rules (
    rule_id           TEXT    PRIMARY KEY,
    severity          TEXT    NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    -- NULL for an inactivity rule watching any sensor.
    sensor            TEXT,
    definition        TEXT    NOT NULL CHECK (json_valid(definition)),
    created_unix_nano INTEGER NOT NULL,
    updated_unix_nano INTEGER NOT NULL
);

-- One row per alert: from FIRED to RESOLVED. A deleted rule's alerts stay.
CREATE TABLE alerts (
    alert_id            INTEGER PRIMARY KEY,
    rule_id             TEXT    NOT NULL,
    device_pk           INTEGER NOT NULL REFERENCES devices (pk),
    sensor              TEXT    NOT NULL,
    severity            TEXT    NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    -- The triggering reading's time and value (NULL value for inactivity).
    fired_unix_nano     INTEGER NOT NULL,
    fired_value         REAL,
    acked_unix_nano     INTEGER,
    resolved_unix_nano  INTEGER,
    resolved_value      REAL,
    message             TEXT    NOT NULL
);

-- At most one open alert per rule and device.
CREATE UNIQUE INDEX alerts_one_open ON alerts (rule_id, device_pk) WHERE resolved_unix_nano IS NULL;

-- Every FIRED, ACKED and RESOLVED event, in order. event_id is the cursor of
-- Ops.WatchAlerts: it only grows.
CREATE TABLE alert_events (
    event_id           INTEGER PRIMARY KEY,
    alert_id           INTEGER NOT NULL REFERENCES alerts (alert_id),
    kind               TEXT    NOT NULL CHECK (kind IN ('fired', 'acked', 'resolved')),
    rule_id            TEXT    NOT NULL,
    device_id          TEXT    NOT NULL,
    sensor             TEXT    NOT NULL,
    severity           TEXT    NOT NULL,
    value              REAL,
    -- The reading's time, or the server's for inactivity and acks.
    time_unix_nano     INTEGER NOT NULL,
    message            TEXT    NOT NULL,
    recorded_unix_nano INTEGER NOT NULL
);
