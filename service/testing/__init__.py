"""What the tests and the benchmarks both need: real servers on free ports
(`servers`), generated ONNX models (`onnx_models`), and the doubles that stand
in for TensorRT where it cannot run (`trt_double`, `gpu_standin`).

Tooling, never imported by the server: a benchmark imports this, not test code.
"""
