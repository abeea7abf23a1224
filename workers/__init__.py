"""Celery workers: the delivery tasks and the email/SMS providers they call."""
