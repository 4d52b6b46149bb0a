"""Workers: the Celery app, one task per job (receives only the job id), the pipeline runner."""
