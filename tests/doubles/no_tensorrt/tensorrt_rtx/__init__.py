"""Double: a machine without tensorrt_rtx. On PYTHONPATH, importing it fails as if not installed."""

raise ImportError("tensorrt_rtx is hidden by tests/doubles/no_tensorrt")
