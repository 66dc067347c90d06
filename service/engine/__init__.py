"""The engine: models, batchers, the scheduler, workers and their executors.

The protocol side reaches it only through `trtserve.service.engine.api`.
"""
