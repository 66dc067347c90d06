"""Double: a machine without tensorrt. On PYTHONPATH, importing it fails as if not installed."""

raise ImportError("tensorrt is hidden by tests/doubles/no_tensorrt")
