"""The way in: the Celery app and its `item.check` task, message validation, filing rows, the client."""
