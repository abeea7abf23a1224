# One image for the server, the delivery workers and the migrate job.
# The base is pinned to a patch release; pin it by digest too (python:3.11.11-slim-bookworm@sha256:...)
# when your registry policy asks for it.

FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
RUN python -m venv /opt/twofactor
COPY clients/python clients/python
COPY pyproject.toml README.md constraints.txt ./
COPY server server
COPY workers workers
# Every dependency at the version the suite passed with (constraints.txt).
RUN /opt/twofactor/bin/pip install --no-cache-dir -c constraints.txt ./clients/python .

FROM python:3.11.11-slim-bookworm
# A non-root user that owns the data directory (the embedded SQLite file, development keys).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/twofactor --create-home twofactor
COPY --from=build /opt/twofactor /opt/twofactor
ENV PATH=/opt/twofactor/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TWOFACTOR_LISTEN=0.0.0.0:50051 \
    TWOFACTOR_DATA_DIR=/var/lib/twofactor
USER twofactor
WORKDIR /var/lib/twofactor
VOLUME ["/var/lib/twofactor"]
EXPOSE 50051 9464
# The server's own gRPC health service; workers override it with `twofactor worker-health`.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["twofactor", "health", "--timeout", "3"]
# SIGTERM: the server drains in-flight calls; a worker finishes the delivery in flight (Celery's warm shutdown).
STOPSIGNAL SIGTERM
CMD ["twofactor", "serve"]
