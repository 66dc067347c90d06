"""Test doubles: stand-ins for libraries and hardware the CI machine lacks.

The TensorRT doubles that the benchmarks use too (`trt_double`, `gpu_standin`)
live in service/testing/, so that a benchmark imports no test code.
"""
