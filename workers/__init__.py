"""The Celery delivery workers: a thin adapter over twofactor_server.delivery (the task, the app)."""
