# syntax=docker/dockerfile:1
#
# fastfeed gateway image.
#
#   docker build -t fastfeed:0.1.0 .
#   docker run --rm -p 8080:8080 -e FASTFEED_SIMULATE=500 fastfeed:0.1.0
#
# Every setting is a FASTFEED_* environment variable (see docs/operations.md);
# arguments after the image name replace CMD, e.g. `serve --simulate 500`.

ARG PYTHON_VERSION=3.11

# ---- build: compile the Cython core and collect every wheel ----------------
# The full python image carries gcc, make and the Python headers the core needs.
FROM python:${PYTHON_VERSION}-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# README.md is the package's long description (pyproject.toml), so the build needs it.
COPY pyproject.toml setup.py README.md ./
COPY src ./src

# FASTFEED_DEBUG=1 builds the core with asserts and bounds checks.
ARG FASTFEED_DEBUG=0
ENV FASTFEED_DEBUG=${FASTFEED_DEBUG}

# One directory holding the fastfeed wheel and the wheels of all its
# dependencies, so the runtime stage installs offline and needs no compiler.
RUN pip wheel --wheel-dir /wheels .

# ---- runtime: slim image, no compiler, non-root ---------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="fastfeed" \
      org.opencontainers.image.description="Real-time market-data WebSocket gateway" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 fastfeed \
 && useradd --system --no-log-init --uid 10001 --gid fastfeed \
        --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin fastfeed

RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/fastfeed-*.whl \
 && python -c "import fastfeed._core"

# Defaults suited to a container; override any of them with -e / env:.
# FASTFEED_WORKERS stays 1 (the embedded mode, no Redis needed): more workers
# share ticks through Redis, so set FASTFEED_WORKERS=auto with FASTFEED_REDIS
# (as k8s/ does).
ENV FASTFEED_HOST=0.0.0.0 \
    FASTFEED_PORT=8080 \
    FASTFEED_LOG_FORMAT=json \
    FASTFEED_DRAIN_S=20 \
    FASTFEED_DRAIN_DELAY_S=2

USER 10001:10001
WORKDIR /tmp
EXPOSE 8080

# Liveness from inside the container with the standard library only (the slim
# image has no curl). The port follows FASTFEED_PORT.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FASTFEED_PORT', '8080'), timeout=2)"]

# SIGTERM starts the graceful drain (readyz 503, then 1012 closes in waves over
# FASTFEED_DRAIN_S, then exit 0); a second SIGTERM exits at once.
STOPSIGNAL SIGTERM
ENTRYPOINT ["fastfeed"]
CMD ["serve"]
