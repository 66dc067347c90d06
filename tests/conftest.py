# First, before anything imports grpc: the servers in these tests run on the
# gRPC settings `trtserve serve` runs on.
from trtserve.client import grpc_tuning  # isort: skip

from pathlib import Path

import pytest

from trtserve.service.example_model import write_example

# In-process servers in these tests must run on the transport `trtserve serve` runs
# on; a plugin or import that loads grpc first would silently change that.
assert grpc_tuning.APPLIED_HERE, "grpc was imported before trtserve.client.grpc_tuning"


@pytest.fixture(scope="session")
def example_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_example(tmp_path_factory.mktemp("models") / "example.onnx")
