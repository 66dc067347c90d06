# trtserve — `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PORT   ?= 8001
GEN    := service/gen
# grpc.health.v1 and grpc.reflection.v1 are shipped for clients that load
# protos at run time; the server uses grpcio-health-checking's and
# grpcio-reflection's own generated modules, so no Python is generated for them.
PROTOS := $(shell find protos -name '*.proto' -not -path 'protos/grpc/*')

.DEFAULT_GOAL := help
.PHONY: help install install-runtime proto example serve test test-gpu lint bench bench-gpu clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/\$$(PORT)/$(PORT)/g' | \
		awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

# Two stamps: serving needs only the runtime dependencies (plus grpcio-tools,
# which generates the gRPC code from protos/); the tests, linters and
# benchmarks add the test and dev extras on top of that.
$(VENV)/.installed-runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[codegen]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-runtime pyproject.toml
	$(PY) -m pip install -q -e '.[codegen,test,dev]'
	# tensorrt-stubs declares a dependency on the full TensorRT wheels (NVIDIA's
	# index); it is a typing-only package, so it goes in without them.
	$(PY) -m pip install -q --no-deps 'tensorrt-stubs>=10.13'
	touch $@

install-runtime: $(VENV)/.installed-runtime $(GEN)/.generated ## create .venv with what serving needs, generate gRPC code

install: $(VENV)/.installed-dev $(GEN)/.generated ## install-runtime, then the test and dev extras

# protoc writes imports as `from trtserve.v1 import x`; they live under
# trtserve.client.gen here, so the imports are rewritten to that package. The types go
# into trtserve's own descriptor pool (service/descriptors.py says why).
$(GEN)/.generated: $(PROTOS) $(VENV)/.installed-runtime Makefile
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) $(PROTOS)
	find $(GEN) -name '*.py*' -exec sed -i -E \
	  -e 's/^from (trtserve\.v1|inference) import/from trtserve.client.gen.\1 import/' \
	  -e 's/^from google.protobuf import descriptor_pool as _descriptor_pool$$/from trtserve.client import descriptors as _descriptor_pool/' {} +
	find $(GEN) -type d -exec touch {}/__init__.py \;
	touch $@

proto: $(GEN)/.generated ## generate the Python gRPC code from protos/

models/example.onnx: $(VENV)/.installed-runtime service/example_model.py
	$(PY) -m trtserve.service.example_model models/example.onnx

example: install-runtime models/example.onnx ## write the example ONNX model to models/example.onnx

serve: example ## serve the example model on the CPU (ONNX Runtime) on port $(PORT)
	$(VENV)/bin/trtserve serve --model example=models/example.onnx --port $(PORT)

test: install ## run the test suite (GPU tests skip without a GPU)
	$(PY) -m pytest -q

test-gpu: install ## run only the GPU tests (needs an NVIDIA GPU)
	$(PY) -m pytest -q -m gpu

lint: install ## ruff, mypy, and mypy on the TensorRT modules against tensorrt-stubs
	$(VENV)/bin/ruff check service client tests benchmarks
	$(VENV)/bin/mypy service client
	$(PY) -m pytest -q tests/test_typecheck.py

bench: install ## CPU serving benchmarks; writes docs/benchmarks.md
	$(PY) -m benchmarks.cpu

bench-gpu: install ## GPU benchmark with the stand-in (needs a GPU and CuPy); writes docs/benchmarks-gpu.md
	$(PY) -m benchmarks.gpu_standin

clean: ## remove the venv, generated code and models
	rm -rf $(VENV) $(GEN) models
