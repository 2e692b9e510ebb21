-- The readings feed (WatchReadings): every committed batch, in commit order,
-- at a position of its own.
--
-- Public: readings_feed_consumers (named consumers' committed cursors).
-- Internal: readings_feed (the log), readings_feed_counter.
--
-- Positions come from one counter row that every group commit updates last,
-- just before it commits, and whose lock it holds until then (as the alert
-- events' ids, migration 0005): the next writer numbers only after this one
-- is visible, so positions become visible in order and a rollback gives
-- them back. A reader that has seen position N never sees a smaller one
-- appear later, with two writers or several server processes alike.
--
-- A batch's readings are kept here a second time, packed (about 16 bytes a
-- reading), so the feed reads in position order without touching the
-- readings table, and keeps them for its own retention
-- (--feed-retention), whatever happens to the readings table.
CREATE TABLE readings_feed (
    position            BIGINT  PRIMARY KEY,
    device_pk           BIGINT  NOT NULL REFERENCES devices (pk),
    batch_sequence      BIGINT  NOT NULL,
    readings            INTEGER NOT NULL,
    committed_unix_nano BIGINT  NOT NULL,
    payload             BYTEA   NOT NULL
);
-- Packed floats do not compress: no attempt, no CPU spent on one.
ALTER TABLE readings_feed ALTER COLUMN payload SET STORAGE EXTERNAL;

-- last_position: the newest committed position (0: none yet).
-- earliest_position: the oldest position retention left; the feed holds
-- earliest_position ..= last_position, with no hole.
CREATE TABLE readings_feed_counter (
    singleton         BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    last_position     BIGINT  NOT NULL,
    earliest_position BIGINT  NOT NULL
);
INSERT INTO readings_feed_counter (last_position, earliest_position) VALUES (0, 1);

-- A named consumer's committed cursor: the feed position it has read
-- through, and how far into that position's batch (next_index: the index
-- in the batch of the first reading not yet read; 4294967295 when the whole
-- batch was read).
CREATE TABLE readings_feed_consumers (
    name              TEXT   PRIMARY KEY,
    position          BIGINT NOT NULL,
    next_index        BIGINT NOT NULL,
    updated_unix_nano BIGINT NOT NULL
);
