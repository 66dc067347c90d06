"""GPU tests: they run on a machine with an NVIDIA GPU, CuPy and cuda-python."""
