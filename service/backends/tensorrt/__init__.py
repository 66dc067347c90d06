"""TensorRT serving: load an engine (load), run it on a worker's stream (executor), CUDA
runtime calls (cuda), and the TensorRT library itself (api)."""
