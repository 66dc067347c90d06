"""The engine: models, batchers, the scheduler, workers and their executors.

The protocol side reaches it only through `trtserve.service.engine.api`.

A request's path, module by module:
    api.py         the seam: `Engine`, the plain data that crosses it
    local.py       the engine in this process (remote.py in a frontend process,
                   over the link to host.py in the engine's)
    repository.py  the served models by name; load, unload, reload (watch.py)
    model.py       one model: validate (batch.Validated), queue, answer
    batch.py       Request and Batch: merged for the executor, split back, and
                   each request's future completed, all here
    batcher.py     requests into batches; asks the model through `Dispatcher`
    scheduler.py   which worker takes a batch
    worker.py      a thread that owns one executor and runs one batch at a time
Beside it: stats.py (counters), timer.py (the serving clock, a precise timer),
regions.py and cuda_ipc.py (shared-memory regions clients register).
"""
