"""Test doubles: stand-ins for libraries and hardware the CI machine lacks, and for
what a test must hold still.

The TensorRT doubles that the benchmarks use too (`trt_double`, `gpu_standin`)
live in service/testing/, so that a benchmark imports no test code.
`unary_call` stands in for a gRPC call whose answers the test holds until it has
seen what it checks, so the load generators' unit tests wait on no clock (their
runs against a real server are in tests/bench/test_bench.py).
"""
