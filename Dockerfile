# syntax=docker/dockerfile:1
# ecg-stream image: one console script, `ecg-stream`, default subcommand `worker`.
#   docker build -t ecg-stream:0.1.0 .
#   docker run --rm -e ECG_BOOTSTRAP_SERVERS=kafka:9092 -p 9108:9108 ecg-stream:0.1.0
ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: CPU-only torch, then the project (with its packaged weights) into a venv ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
ARG TORCH_VERSION=2.13.0
# The CPU wheel index keeps CUDA libraries (several GB) out of the image.
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README* ./
COPY models ./models
COPY stream ./stream
COPY simulator ./simulator
RUN pip install . \
 && python -c "import models, pathlib, sys; \
w = sorted(pathlib.Path(models.__file__).parent.glob('weights/*.pt')); \
print('packaged weights:', [p.name for p in w]); sys.exit(0 if w else 'no weights in models/weights')"

# ---- runtime: the venv only, no compiler, non-root ----
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="ecg-stream" \
      org.opencontainers.image.description="Streaming ECG beat repair, classification and anomaly flags over Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 ecg \
 && useradd --system --uid 10001 --gid ecg --home-dir /home/ecg --create-home ecg \
 && mkdir -p /cache && chown ecg:ecg /cache
COPY --from=build /opt/venv /opt/venv
# XDG_CACHE_HOME: PhysioNet downloads and beat caches (mount a volume at /cache to keep them).
# ECG_HEALTH_PORT: the port HEALTHCHECK probes (9108 worker, 9109 evaluate-live, 9110 simulate);
# it is not a config key (no "__"), the config loader ignores it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/cache \
    ECG_HEALTH_PORT=9108
USER 10001:10001
WORKDIR /home/ecg
EXPOSE 9108 9109 9110
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('ECG_HEALTH_PORT', '9108'), timeout=4)"]
# Exec form: SIGTERM reaches the worker, which drains (< 10 s) and commits before exiting.
ENTRYPOINT ["ecg-stream"]
CMD ["worker"]
