#!/bin/sh
# Runs once, when the PostgreSQL volume is first initialised (mounted into
# /docker-entrypoint-initdb.d by deploy/compose.yaml): a read-only role for
# Grafana's SQL reports, with SELECT on every table the `ingest` role's
# migrations will create.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v password="$(cat /run/secrets/grafana_db_password)" -v db="$POSTGRES_DB" -v owner="$POSTGRES_USER" <<'SQL'
CREATE ROLE grafana_reader LOGIN PASSWORD :'password';
GRANT CONNECT ON DATABASE :"db" TO grafana_reader;
GRANT USAGE ON SCHEMA public TO grafana_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO grafana_reader;
SQL
