-- Several server processes on one database: who is alive, and which of them
-- holds each device's Control stream.
--
-- Public (stable for SQL reporting): device_sessions.device_pk, replica_id
--   (NULL once the stream ended), generation, connected_unix_nano;
--   replicas.replica_id, addr, started_unix_nano, lease_until_unix_nano.
--   devices.online keeps its meaning: the device holds a Control stream on a
--   live server process.
-- On SQLite one process serves the database (it refuses a second), so
-- replicas stays empty.

CREATE TABLE replicas (
    -- A fresh id per process start: a restarted process is a new replica.
    replica_id            TEXT   PRIMARY KEY,
    addr                  TEXT   NOT NULL,
    started_unix_nano     INTEGER NOT NULL,
    -- Renewed every few seconds; a replica past it is dead, and any other
    -- replica sweeps its sessions.
    lease_until_unix_nano INTEGER NOT NULL
);

CREATE TABLE device_sessions (
    device_pk           INTEGER PRIMARY KEY REFERENCES devices (pk),
    -- NULL: no stream now.
    replica_id          TEXT,
    -- Issued by the database, one more per stream opened: a fencing token
    -- comparable across processes. A stream's later writes name it, so a
    -- late disconnect of a superseded stream changes nothing.
    generation          INTEGER NOT NULL,
    connected_unix_nano INTEGER NOT NULL
);

CREATE INDEX device_sessions_replica ON device_sessions (replica_id) WHERE replica_id IS NOT NULL;

-- No stream is recorded yet, so no device is online.
UPDATE devices SET online = FALSE WHERE online;
