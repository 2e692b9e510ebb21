#!/bin/sh
# Creates the files deploy/compose.yaml mounts as secrets, in deploy/secrets/
# (git-ignored). Keeps what exists; delete a file to make it anew.
#
#   deploy/compose/make-secrets.sh            # as root (or with sudo) to hand
#                                             # the ingester's files to uid 65532
#
# - ops_token: the operators' token (INGEST_OPS_TOKEN_FILE); use it with
#   `ingest --ops-token-file deploy/secrets/ops_token ...`.
# - postgres_password, ingest.pgpass: the database role `ingest`'s password,
#   for PostgreSQL (POSTGRES_PASSWORD_FILE) and for the ingester (PGPASSFILE,
#   which must be 0600 and owned by the reader, uid 65532).
# - grafana_db_password, grafana_admin_password.
# - ca.crt, tls.crt, tls.key: a private CA and a server certificate for the
#   names the compose services answer to (ingest, ingest-sqlite, localhost,
#   127.0.0.1). Replace tls.crt/tls.key with your own: the ingester reloads
#   them when they change.
set -eu
dir="$(cd "$(dirname "$0")/.." && pwd)/secrets"
mkdir -p "$dir"
chmod 0700 "$dir"
cd "$dir"
umask 077

rand() { openssl rand -hex 32; }
[ -s ops_token ] || printf 'ops_%s\n' "$(rand)" > ops_token
[ -s postgres_password ] || rand > postgres_password
[ -s grafana_db_password ] || rand > grafana_db_password
[ -s grafana_admin_password ] || rand > grafana_admin_password
[ -s ingest.pgpass ] || printf 'postgres:5432:telemetry:ingest:%s\n' "$(cat postgres_password)" > ingest.pgpass

if [ ! -s tls.key ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
        -subj "/CN=telemetry-ingest compose CA" -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=ingest" -keyout tls.key.pkcs8 -out tls.csr 2>/dev/null
    printf 'subjectAltName=DNS:ingest,DNS:ingest-sqlite,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > tls.ext
    openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 90 \
        -extfile tls.ext -out tls.crt 2>/dev/null
    mv tls.key.pkcs8 tls.key
    rm -f tls.csr tls.ext ca.srl
fi

# The ingester, device-sim and Grafana run as uid 65532; PostgreSQL's init
# script (as uid 999) reads grafana_db_password.
# (Files already handed over on an earlier run are left as they are.)
chmod 0400 ops_token ingest.pgpass tls.key grafana_admin_password postgres_password 2>/dev/null || true
chmod 0444 ca.crt tls.crt grafana_db_password 2>/dev/null || true
if [ "$(id -u)" = 0 ]; then
    chown 65532:65532 ops_token ingest.pgpass tls.key grafana_admin_password
else
    echo "not root: run 'sudo chown 65532:65532 $dir/ops_token $dir/ingest.pgpass $dir/tls.key $dir/grafana_admin_password'" >&2
    echo "(the containers run as uid 65532 and must read them; ingest.pgpass must stay 0600 or stricter)" >&2
fi
echo "secrets in $dir"
