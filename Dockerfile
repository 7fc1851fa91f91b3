# syntax=docker/dockerfile:1
#
# fastfeed gateway image.
#
#   docker build -t fastfeed:0.1.0 .
#   docker run --rm -p 8080:8080 -e FASTFEED_SIMULATE=500 fastfeed:0.1.0
#
# Every setting is a FASTFEED_* environment variable (see docs/operations.md);
# arguments after the image name replace CMD, e.g. `serve --simulate 500`.
#
# Behind a TLS-inspecting proxy, give the build your CA bundle as a secret
# (used by pip during the build only, never stored in a layer):
#
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt -t fastfeed:0.1.0 .
#   podman build --format docker --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt \
#       -t fastfeed:0.1.0 .
#
# Why debian:bookworm-slim with Debian's own python3 (3.11), and not the
# python:3.11 images: the whole image is then one distribution, Debian
# bookworm, whose packages (security fixes included) come from one archive
# through apt, and whose base can be rebuilt from that archive alone with
# `debootstrap --variant=minbase bookworm` where no container registry is
# reachable (the tests do exactly that). The application lives in a venv
# (/opt/fastfeed), so pip never touches the system Python.
#
# Two stages: `build` has gcc and the Python headers, compiles the Cython core
# and installs the wheels into the venv; `runtime` has only python3 and
# receives the finished venv. No compiler, no pip cache, no build secret ends
# up in the runtime image.

# ---- build: compile the Cython core, fill the venv --------------------------
FROM debian:bookworm-slim AS build

# Package versions are not pinned (DL3008): they follow bookworm and its
# security updates; a pin would break as soon as the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        gcc libc6-dev python3 python3-dev python3-venv \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/fastfeed/bin:$PATH

# The venv's python is a symlink to /usr/bin/python3, which the runtime stage
# has at the same path from the same Debian package.
RUN python3 -m venv /opt/fastfeed

WORKDIR /src
# README.md is the package's long description (pyproject.toml), so the build needs it.
COPY pyproject.toml setup.py README.md ./
COPY src ./src

# FASTFEED_DEBUG=1 builds the core with asserts and bounds checks.
ARG FASTFEED_DEBUG=0
ENV FASTFEED_DEBUG=${FASTFEED_DEBUG}

# The optional secret `ca` is a CA bundle for a TLS-inspecting proxy between
# the build and the package index; without it pip trusts the public CAs it
# ships with. pip and setuptools leave the venv afterwards: the runtime never
# installs anything.
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip wheel --wheel-dir /wheels . \
 && pip install --no-index --find-links=/wheels /wheels/fastfeed-*.whl \
 && pip uninstall -y -q pip setuptools \
 && python -c "import fastfeed._core, fastfeed._tickjson"

# ---- runtime: bookworm-slim, python3, the venv; no compiler, non-root -------
FROM debian:bookworm-slim AS runtime

LABEL org.opencontainers.image.title="fastfeed" \
      org.opencontainers.image.description="Real-time market-data WebSocket gateway" \
      org.opencontainers.image.licenses="Apache-2.0"

# python3 runs the venv; ca-certificates lets rediss:// verify the Redis
# server's certificate against the public CAs.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can check it.
RUN groupadd --gid 10001 fastfeed \
 && useradd --no-log-init --uid 10001 --gid fastfeed \
        --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin fastfeed

COPY --from=build /opt/fastfeed /opt/fastfeed

ENV PATH=/opt/fastfeed/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

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
# image has no curl). The port follows FASTFEED_PORT. Podman keeps a
# HEALTHCHECK only in the docker image format: `podman build --format docker`.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FASTFEED_PORT', '8080'), timeout=2)"]

# SIGTERM starts the graceful drain (readyz 503, then 1012 closes in waves over
# FASTFEED_DRAIN_S, then exit 0); a second SIGTERM exits at once.
STOPSIGNAL SIGTERM
ENTRYPOINT ["fastfeed"]
CMD ["serve"]
