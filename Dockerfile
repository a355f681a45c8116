# syntax=docker/dockerfile:1
# ecg-stream images: one console script, `ecg-stream`. Two targets:
#   docker build -t ecg-stream:0.1.0 .                                  # worker (default target)
#   docker build --target simulator -t ecg-stream-simulator:0.1.0 .    # + MIT-BIH reading (wfdb)
#   docker run --rm -e ECG_BOOTSTRAP_SERVERS=kafka:9092 -p 9108:9108 ecg-stream:0.1.0
# The worker image holds only what the worker, evaluate-live, tail and create-topics import:
# no wfdb, pandas, scipy, scikit-learn or matplotlib (pyproject's `data` and `train` extras).
ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: CPU-only torch, then the project (with its packaged weights) into a venv ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The compiler lives only in this stage; pinning Debian's version of it would only break builds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# The CPU wheel index keeps CUDA libraries (several GB) out of the image.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /src
COPY pyproject.toml README* ./
COPY models ./models
COPY stream ./stream
COPY simulator ./simulator
# The project itself, its dependencies bounded by pyproject.toml.
# hadolint ignore=DL3013
RUN pip install . \
 && python -c "import models, pathlib, sys; \
w = sorted(pathlib.Path(models.__file__).parent.glob('weights/*.pt')); \
print('packaged weights:', [p.name for p in w]); sys.exit(0 if w else 'no weights in models/weights')"

# ---- build-data: the same venv plus the `data` extra, for the simulator ----
FROM build AS build-data
# hadolint ignore=DL3013
RUN pip install ".[data]"

# ---- runtime: the venv only, no compiler, non-root ----
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="ecg-stream" \
      org.opencontainers.image.description="Streaming ECG beat repair, classification and anomaly flags over Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 ecg \
 && useradd --system --uid 10001 --gid ecg --home-dir /home/ecg --create-home ecg \
 && mkdir -p /cache && chown ecg:ecg /cache
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

# ---- simulator: replays MIT-BIH (wfdb, scipy) ----
FROM runtime AS simulator
COPY --from=build-data /opt/venv /opt/venv
ENV ECG_HEALTH_PORT=9110
CMD ["simulate"]

# ---- worker (the default target, last): also evaluate-live, tail, create-topics ----
FROM runtime AS worker
COPY --from=build /opt/venv /opt/venv
CMD ["worker"]
