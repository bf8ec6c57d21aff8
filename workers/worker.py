"""The worker's Celery app, configured from PIVOTMERGE_* variables:

    celery -A workers.worker worker -Q gpu
"""

from app.settings import Settings

from .celery_app import make_celery

celery = make_celery(Settings())
