"""`make bench`: trtserve's serving benchmarks on the CPU (ONNX Runtime), in one go.

    .venv/bin/python -m benchmarks.cpu            # everything, ~16 minutes
    .venv/bin/python -m benchmarks.cpu --quick    # a smoke run with short windows

It writes the models it needs under models/bench/, starts every server as a
child process on loopback, drives each with `trtserve-client bench` (the
library behind it), and writes the results between the markers of
docs/benchmarks.md, with the commands that reproduce each number, the
machine and the date. Every comparison is a ratio taken within this one run,
so the noise of a shared machine hits both sides alike; each is repeated
(`--rounds`) and every round is reported.

1. Served over raw: served throughput (gRPC, dynamic batching) over the same
   backend in-process (`trtserve profile`) at the batch size the server formed.
2. Dynamic batching gain at concurrency 64: batching on vs max_batch_size 1.
3. Against PyTriton (Triton + a Python model holding the same ONNX Runtime
   session, with Triton's dynamic batcher), both over KServe v2.
4. Service overhead at concurrency 1: p50 end-to-end minus the backend's own
   time, split into what gRPC in Python costs anyway (a no-op server,
   benchmarks/grpc_floor.py) and what trtserve adds.
5. Memory: server resident memory idle and under load, per worker.
6. Where the event loop's time goes under load (cProfile of the loop thread).
7. Many cores: served over raw as ONNX Runtime's intra-op threads and
   spinning vary (on machines with 4 or more usable cores).
8. One engine, N frontend processes (`--frontends N`): requests/s at high
   concurrency and p50 at concurrency 1, against N = 1 in the same round.

PyTriton runs in its own virtual environment (default /tmp/pytriton-venv,
created with a Python 3.12 from pyenv when missing): its Triton server copies
the Python-backend stub built for the interpreter that runs PyTriton
(python_backend_stubs/<major.minor>), and that stub links libpython, so the
interpreter's LIBDIR goes on LD_LIBRARY_PATH.
"""
