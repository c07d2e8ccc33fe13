# longdl as a container: `docker build -t longdl .` then `docker run -p 3000:3000 longdl`.
# Zero configuration uses SQLite and local storage under DATA_DIR (a volume); set
# STORAGE_BACKEND=s3 and S3_* for S3 (see examples/docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data \
    PORT=3000

WORKDIR /app
COPY pyproject.toml README.md ./
COPY longdl ./longdl
RUN pip install . \
    && useradd --create-home --uid 10001 longdl \
    && mkdir -p /data \
    && chown longdl:longdl /data

USER longdl
VOLUME ["/data"]
EXPOSE 3000

# /health answers 503 when SQLite or storage fails; urlopen raises on it. (No curl in slim.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '3000'), timeout=4)"

CMD ["longdl", "serve"]
