"""Building TensorRT engines from ONNX, apart from serving them: the build (build), its
options (options), under MPS (mps), its manifest (manifest), engine inspection (inspect),
the builder's log (log), the `trtserve build` command (cli) and its settings (settings)."""
