# trtserve — `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PORT   ?= 8001
# The public protocols' Python goes to the client's package (trtserve.client.gen),
# the internal link's to the server's (trtserve.service.gen). grpc.health.v1 and
# grpc.reflection.v1 are shipped for clients that load protos at run time; the
# server uses grpcio-health-checking's and grpcio-reflection's own generated
# modules, so no Python is generated for them.
GEN             := client/gen/.generated
PUBLIC_PROTOS   := $(shell find protos -name '*.proto' -not -path 'protos/grpc/*' -not -path 'protos/trtserve/internal/*')
INTERNAL_PROTOS := $(shell find protos/trtserve/internal -name '*.proto')
# The generated packages, which both distributions list: pip needs the folders to
# exist before the code is generated into them (protoc comes with the install).
GEN_PACKAGES    := client/gen/trtserve/v1 client/gen/inference service/gen/trtserve/internal

.DEFAULT_GOAL := help
.PHONY: help install install-runtime proto example serve test test-gpu lint bench bench-gpu client-wheel clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/\$$(PORT)/$(PORT)/g' | \
		awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

# Two stamps: serving needs only the runtime dependencies (plus grpcio-tools,
# which generates the gRPC code from protos/); the tests, linters and
# benchmarks add the test and dev extras on top of that.
#
# The client (client/pyproject.toml, distribution trtserve-client) installs first:
# the server's distribution depends on it.
$(VENV)/.installed-runtime: pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	mkdir -p $(GEN_PACKAGES)
	$(PY) -m pip install -q -e ./client -e '.[codegen]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-runtime pyproject.toml client/pyproject.toml
	$(PY) -m pip install -q -e ./client -e '.[codegen,test,dev]'
	# tensorrt-stubs declares a dependency on the full TensorRT wheels (NVIDIA's
	# index); it is a typing-only package, so it goes in without them.
	$(PY) -m pip install -q --no-deps 'tensorrt-stubs>=10.13'
	touch $@

install-runtime: $(VENV)/.installed-runtime $(GEN) ## create .venv with what serving needs, generate gRPC code

install: $(VENV)/.installed-dev $(GEN) ## install-runtime, then the test and dev extras

# protoc writes imports as `from trtserve.v1 import x`; the generated packages live
# under $(2) here, so the imports are rewritten to it. The types go into trtserve's
# own descriptor pool (client/descriptors.py says why).
define protoc
	rm -rf $(1) && mkdir -p $(1)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1) $(3)
	find $(1) -name '*.py*' -exec sed -i -E \
	  -e 's/^from (trtserve\.v1|trtserve\.internal|inference) import/from $(2).\1 import/' \
	  -e 's/^from google.protobuf import descriptor_pool as _descriptor_pool$$$$/from trtserve.client import descriptors as _descriptor_pool/' {} +
	find $(1) -type d -exec touch {}/__init__.py \;
endef

$(GEN): $(PUBLIC_PROTOS) $(INTERNAL_PROTOS) $(VENV)/.installed-runtime Makefile
	$(call protoc,client/gen,trtserve.client.gen,$(PUBLIC_PROTOS))
	$(call protoc,service/gen,trtserve.service.gen,$(INTERNAL_PROTOS))
	touch $@

proto: $(GEN) ## generate the Python gRPC code from protos/

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
	# mypy finds packages by folder, so it reads the tree through a link farm
	# shaped as installed (trtserve/service, trtserve/client).
	rm -rf build/typecheck && mkdir -p build/typecheck/trtserve
	ln -s ../../../service build/typecheck/trtserve/service
	ln -s ../../../client build/typecheck/trtserve/client
	MYPYPATH=build/typecheck $(VENV)/bin/mypy -p trtserve.service -p trtserve.client
	$(PY) -m pytest -q tests/test_typecheck.py

bench: install ## CPU serving benchmarks; writes docs/benchmarks.md
	$(PY) -m benchmarks.cpu

bench-gpu: install ## GPU benchmark with the stand-in (needs a GPU and CuPy); writes docs/benchmarks-gpu.md
	$(PY) -m benchmarks.gpu_standin

client-wheel: $(GEN) ## build the client's own wheel (trtserve-client: grpcio, protobuf, numpy) into dist/
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist ./client

clean: ## remove the venv, generated code, wheels and models
	rm -rf $(VENV) client/gen service/gen dist models
