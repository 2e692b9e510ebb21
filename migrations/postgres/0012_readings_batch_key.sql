-- Each reading with the batch that brought it: its batch's sequence and its
-- place in that batch (the batch's readings counted series after series,
-- from 0). (device, batch_sequence, batch_index) names one reading whichever
-- way it arrives again: a consumer of the readings feed deduplicates by it.
-- SQLite has the same columns (there they also make the clustered key
-- unique).
--
-- PostgreSQL keeps rows in a heap whatever the key, so the layout stays:
-- day partitions with a (sensor_pk, time_unix_nano) index each. Readings
-- stored before this migration get batch_sequence 0 (a batch's sequence
-- starts at 1) and batch_index 0. A constant default adds the columns
-- without rewriting a partition.
ALTER TABLE readings
    ADD COLUMN batch_sequence BIGINT  NOT NULL DEFAULT 0,
    ADD COLUMN batch_index    INTEGER NOT NULL DEFAULT 0;
