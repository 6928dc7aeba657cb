# PostgreSQL for the local compose stack (docker-compose.local.yml), from Debian's postgresql
# package on the same base as kd-pipeline:cpu, for hosts where the postgres image cannot be
# pulled. It behaves like the official image where the stack relies on it: POSTGRES_USER,
# POSTGRES_PASSWORD and POSTGRES_DB on first start, *.sql from /docker-entrypoint-initdb.d, data
# in /var/lib/postgresql/data (a named volume), pg_isready for the healthcheck.
#   docker build -f docker/postgres.Dockerfile -t kd-postgres:15 --build-arg BASE_IMAGE=kd-base:bookworm .
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/postgresql/data /run/postgresql /docker-entrypoint-initdb.d \
 && chown -R postgres:postgres /var/lib/postgresql /run/postgresql

ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY docker/postgres-entrypoint.sh /usr/local/bin/kd-postgres-entrypoint
VOLUME /var/lib/postgresql/data
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/kd-postgres-entrypoint"]
