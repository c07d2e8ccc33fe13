# longdl as a container. The README's "Run it in a container" walks through it:
#   docker build -t longdl .
#   docker run --rm -v longdl-data:/data longdl longdl seed      # demo files (optional)
#   docker run -d -p 3000:3000 -v longdl-data:/data longdl
# Zero configuration uses SQLite and local storage under DATA_DIR (/data, a volume); the
# original service's S3_* variables select S3 (see examples/docker-compose.yml).
# `make container-test` builds and checks this file with podman.

# Installed into a virtualenv (works the same on the official image's /usr/local Python
# and on a Debian python3 under /usr).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/longdl/bin:$PATH \
    DATA_DIR=/data \
    PORT=3000

# The sources come in through a read-only bind mount and are built in a scratch copy
# removed in the same step, so the only copy in the image is the installed package (no
# build/, no *.egg-info, nothing written back to the build context).
# uid/gid 10001: a bind-mounted DATA_DIR must be writable by it (chown -R 10001 DIR).
RUN --mount=type=bind,source=.,target=/mnt/context \
    cp -r /mnt/context /tmp/longdl-src \
    && python3 -m venv /opt/longdl \
    && /opt/longdl/bin/pip install '/tmp/longdl-src[redis]' \
    && rm -rf /tmp/longdl-src \
    && /opt/longdl/bin/pip uninstall -y pip setuptools \
    && groupadd --gid 10001 longdl \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /data \
        --shell /usr/sbin/nologin longdl \
    && mkdir -p /data \
    && chown longdl:longdl /data

# Numeric, so orchestrators can tell it is not root (runAsNonRoot).
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 3000

# /health answers 503 when SQLite or storage fails; urlopen raises on it. (No curl in slim.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '3000'), timeout=4)"

# SIGTERM (docker/podman stop): running jobs get SHUTDOWN_GRACE_S (7 s), under the 10 s
# the engine waits; the rest go back to the queue. Give jobs longer: README, "Stopping".
CMD ["longdl", "serve"]
