# herald-smtp image: gunicorn + Flask on slim Python 3.11, run as a non-root numeric user.
#   docker build -t herald-smtp .
#   docker run --rm -p 8084:8084 --env-file .env --read-only --tmpfs /tmp -v herald-smtp-data:/data herald-smtp
# No secret is baked in: configuration comes from the environment (or *_FILE secrets) at run time.
# The API key, as a secret file (an edit applies at `docker kill -s HUP <container>`):
#   docker run ... -e API_KEY_FILE=/run/secrets/api_key -v "$PWD/api_key:/run/secrets/api_key:ro" herald-smtp
# or as API_KEY=<a long random string> in the --env-file (a new value needs a new container).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Dependencies go into a venv in a throwaway stage; only the venv is copied on.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt /tmp/requirements.txt
# Wheels only: nothing is compiled, so no compiler is needed; the venv needs no pip at run time.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --only-binary=:all: -r /tmp/requirements.txt \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    IDEMPOTENCY_STORE=sqlite:////data/idempotency.sqlite3
# A numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 herald-smtp \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin herald-smtp \
 && install -d -o 10001 -g 10001 -m 0750 /data
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY app.py gunicorn.conf.py ./
COPY herald_smtp ./herald_smtp
USER 10001:10001
# The idempotency file: a volume, so replays survive a container restart.
VOLUME ["/data"]
EXPOSE 8084
# gunicorn is PID 1 (exec form) and gets SIGTERM itself: in-flight sends finish, then QUIT.
STOPSIGNAL SIGTERM
# slim has no curl; the standard library does the probe. PORT may be ":8084", "8084" or "host:8084".
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = (os.environ.get('PORT') or ':8084').rsplit(':', 1)[-1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:app"]
