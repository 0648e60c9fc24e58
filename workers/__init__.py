"""Celery app, task routing and the migration pipeline stages."""
