-- The readings feed (WatchReadings): every committed batch, in commit order,
-- at a position of its own. The same tables as on PostgreSQL (see its
-- 0013): one counter row hands out positions, taken last in each group
-- commit. SQLite has one writer at a time, so order was never at risk.
--
-- Public: readings_feed_consumers (named consumers' committed cursors).
-- Internal: readings_feed (the log), readings_feed_counter.
CREATE TABLE readings_feed (
    position            INTEGER PRIMARY KEY,
    device_pk           INTEGER NOT NULL REFERENCES devices (pk),
    batch_sequence      INTEGER NOT NULL,
    readings            INTEGER NOT NULL,
    committed_unix_nano INTEGER NOT NULL,
    payload             BLOB    NOT NULL
);

CREATE TABLE readings_feed_counter (
    singleton         INTEGER PRIMARY KEY CHECK (singleton = 1),
    last_position     INTEGER NOT NULL,
    earliest_position INTEGER NOT NULL
);
INSERT INTO readings_feed_counter (singleton, last_position, earliest_position) VALUES (1, 0, 1);

CREATE TABLE readings_feed_consumers (
    name              TEXT    PRIMARY KEY,
    position          INTEGER NOT NULL,
    next_index        INTEGER NOT NULL,
    updated_unix_nano INTEGER NOT NULL
);
