# One image for the server and the delivery workers.
FROM python:3.11-slim
WORKDIR /app
COPY clients/python /app/clients/python
COPY pyproject.toml README.md /app/
COPY server /app/server
COPY workers /app/workers
RUN pip install --no-cache-dir ./clients/python . && useradd --system twofactor
USER twofactor
EXPOSE 50051
CMD ["twofactor", "serve"]
