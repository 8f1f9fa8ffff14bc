"""The Celery side: the app, the tasks, our kombu transport, micro-batching, message decoding."""
