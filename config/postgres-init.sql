-- Run once by the postgres image on first start (docker-entrypoint-initdb.d),
-- in the POSTGRES_DB database, by the compose demo (deploy/compose.yaml).

-- pg_stat_statements is preloaded on the command line; the view needs the extension.
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;

-- The monitoring role pgotel-proxy uses for PGOTEL_STATS_DSN: it reads
-- pg_stat_activity and pg_stat_statements, nothing else. Demo password only.
CREATE ROLE pgotel LOGIN PASSWORD 'pgotel' IN ROLE pg_monitor;
