"""`trtserve profile`: a backend alone, in-process, batch size by batch size.

    trtserve profile --model example=models/example.onnx --batch-sizes 1,8,32,64 --workers 2

No gRPC, no batcher: each of `--workers` threads builds its own executor
(an ONNX Runtime session, or a TensorRT context on its stream) exactly as a
serving worker does, and runs batches back to back, all workers at once, the
way trtexec runs an engine. For each batch size it reports throughput and
latency per batch; from those it recommends `max_batch_size` and preferred
batch sizes. These are the "raw" numbers that served throughput is compared
with.

"profile" here is the command's name for users; inside it is a sweep over batch
sizes (not a TensorRT optimization profile, nor a cProfile run).
"""
