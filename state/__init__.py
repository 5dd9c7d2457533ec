"""Durable and shared state: task stores, job queues, feedback, the model registry, the shared database, the request cache."""
