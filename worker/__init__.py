"""Celery workers that run conversion jobs (one process per GPU)."""
