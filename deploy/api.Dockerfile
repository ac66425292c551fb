# syntax=docker/dockerfile:1
# loftq-service API image: FastAPI + uvicorn, no torch.
#
# Build from the repository root (the build context must be the repo root):
#   docker build -f deploy/api.Dockerfile -t loftq-service-api .
#
# The API imports only the torch-free parts of the engine (loftq.options, loftq.errors), so the
# project is installed with --no-deps and the service's own dependencies are listed here. The
# version floors match pyproject.toml (tests/deploy/test_deploy_files.py checks that they do, and
# that importing api.main pulls in nothing outside this list and its dependencies).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first: this layer is reused until the list changes.
RUN pip install \
        "fastapi>=0.110" \
        "uvicorn>=0.29" \
        "celery[redis]>=5.3" \
        "redis>=5" \
        "boto3>=1.34" \
        "httpx>=0.27" \
        "pydantic>=2.6" \
        "pydantic-settings>=2.2" \
        "prometheus-client>=0.20" \
        "typer>=0.12" \
        "rich>=13" \
        "google-re2>=1.1"

# The project itself (engine, API, worker packages; the worker package is small and holds the
# Celery app the API enqueues through). Installed into site-packages, then the sources go.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY loftq ./loftq
COPY service ./service
COPY api ./api
COPY worker ./worker
RUN pip install --no-deps . \
    && cd / && rm -rf /src

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/loftq loftq \
    && mkdir -p /app && chown 10001:10001 /app
WORKDIR /app
USER 10001:10001

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# api.server is uvicorn with the LOFTQ_* request timeouts and connection limit (api/server.py);
# the ingress in front adds its own (deploy/README.md, "In front of the API").
CMD ["python", "-m", "api.server", "--host", "0.0.0.0", "--port", "8000"]
