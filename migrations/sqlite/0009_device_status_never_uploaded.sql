-- device_status: seconds_since_last_upload is NULL for a device that has
-- never uploaded. PostgreSQL's view gave 0 there (its GREATEST ignores
-- NULL) and its 0009 fixes that; SQLite's view was right already, since
-- multi-argument MAX(now - NULL, 0) is NULL. Nothing changes here: the
-- file keeps both trees' migrations under the same names.
SELECT 1;
