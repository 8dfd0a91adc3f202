# consent-flow: the worker, the callback server and the operator CLI in one image.
#
#   docker build -t consent-flow .
#   docker run --rm consent-flow --help
#   docker run --rm consent-flow keys generate      # a key for CONSENT_ENCRYPTION_KEYS
#
# Configuration comes from the environment only (CONSENT_*, see README.md); the image holds no
# secret. docker-compose.yml runs it as `worker` and as `serve`.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Only what the package build needs: no .venv, tests, node_modules or local data from the host.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY consent_flow ./consent_flow
COPY workers ./workers
RUN pip install . \
    && rm -rf /src/build /src/*.egg-info

# An unprivileged user with a writable home (the data folder: the worker's spool). The image has
# no redis-server: every command, `up` included, needs CONSENT_REDIS_URL
# (`docker run -e CONSENT_REDIS_URL=redis://... consent-flow up`).
RUN groupadd --system --gid 10001 consent \
    && useradd --system --uid 10001 --gid consent --create-home --home-dir /home/consent \
        --shell /usr/sbin/nologin consent
USER 10001:10001
WORKDIR /home/consent
# The data folder, made by the user: a named volume mounted here starts with its ownership.
RUN mkdir -p /home/consent/.local/share/consent-flow

# The callback server (`serve`, `up`) listens here when CONSENT_HTTP_PORT=8080.
EXPOSE 8080

ENTRYPOINT ["consent-flow"]
CMD ["--help"]
