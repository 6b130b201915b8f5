# The app image: web, worker, beat and consumer all run from it (see docker-compose.yml and the Procfile).
# `--target cdc` builds the CDC relay's image instead (`python manage.py relay_cdc`): the same app plus Debezium's
# engine (requirements-cdc.txt), a Java runtime and MariaDB's JDBC driver, about 300 MB the others do without.
#
# Debian bookworm, pinned: its libmariadb (3.3, OpenSSL) does MySQL 8's caching_sha2_password over a
# plain connection by fetching the server's RSA key; newer Connector/C releases change TLS defaults.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Build dependencies of mysqlclient (compiled from source).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc pkg-config default-libmysqlclient-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt /tmp/requirements.txt
# The lock file: every package pinned with its hashes, nothing resolved at build time.
RUN pip install --require-hashes --no-deps -r /tmp/requirements.txt


FROM build AS build-cdc
COPY requirements-cdc.txt /tmp/requirements-cdc.txt
RUN pip install --require-hashes --no-deps -r /tmp/requirements-cdc.txt


FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
# Runtime only: the MariaDB client library mysqlclient links to (with its auth plugins).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libmariadb3 \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home app
COPY --from=build /opt/venv /opt/venv

WORKDIR /app
# Only what runs (no .venv, .git or local state; tests/test_deploy.py checks every local app is here).
COPY manage.py ./
COPY project ./project
COPY orders ./orders
COPY outbox ./outbox
COPY relay ./relay
COPY inbox ./inbox
COPY stats ./stats
COPY ops ./ops

# The admin's static files, served by whitenoise. Settings need a secret key to load; this one is
# used for this command only and is not in the image's environment.
RUN DJANGO_SECRET_KEY=collectstatic-only-not-a-secret python manage.py collectstatic --noinput \
 && mkdir -p .run \
 && chown app:app .run


FROM runtime AS cdc
# The man directory: the JRE's packages fail to configure without it on slim images.
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends default-jre-headless libmariadb-java \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build-cdc /opt/venv /opt/venv
COPY deploy/debezium/outbox-connector.json ./deploy/debezium/outbox-connector.json
USER app
CMD ["python", "manage.py", "relay_cdc"]


# The default target, last: the app image.
FROM runtime
USER app
EXPOSE 8000
CMD ["gunicorn", "project.wsgi", "--bind", "0.0.0.0:8000", "--workers", "4", "--access-logfile", "-"]
