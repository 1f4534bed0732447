#!/bin/sh
# Runs once, when the PostgreSQL container first creates its data directory (docker-entrypoint-initdb.d).
# bon writes as an ordinary role that owns its database, never as the superuser this image starts with.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v password="$BON_DB_PASSWORD" <<'SQL'
CREATE ROLE bon LOGIN PASSWORD :'password';
CREATE DATABASE bon OWNER bon;
SQL
