"""The GPU side: the Celery worker step, one process per GPU, the loop claiming batches, the batch service."""
