#!/usr/bin/env bash
# Install (if needed) and start a PostgreSQL server on 127.0.0.1 for the store tests, then print the URL
# the tests read from RAG_ECG_TEST_PG. Debian's package; idempotent.
set -euo pipefail
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v pg_lsclusters >/dev/null 2>&1; then
  $SUDO apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
fi
ver=$(pg_lsclusters -h | awk 'NR==1{print $1}')
if [ -z "$ver" ]; then
  ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
  $SUDO pg_createcluster "$ver" main >&2
fi
$SUDO pg_ctlcluster "$ver" main start >&2 2>/dev/null || true
for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
$SUDO runuser -u postgres -- psql -q -c "DO \$\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='rag_ecg') THEN CREATE ROLE rag_ecg LOGIN PASSWORD 'rag_ecg' CREATEDB; END IF; END\$\$;" >&2
$SUDO runuser -u postgres -- psql -q -tc "SELECT 1 FROM pg_database WHERE datname='rag_ecg_test'" | grep -q 1 \
  || $SUDO runuser -u postgres -- createdb -O rag_ecg rag_ecg_test >&2
echo "postgresql+psycopg2://rag_ecg:rag_ecg@127.0.0.1:5432/rag_ecg_test"
