"""The engine: models, batchers, the scheduler, workers and their executors.

The protocol side reaches it only through `service.engine.api`.
"""
