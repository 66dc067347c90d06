"""Soak: 128 concurrent clients and a scraper storm against a `trtserve serve` process.

    TRTSERVE_SOAK_SECONDS=180 .venv/bin/python -m pytest -q -s -m soak tests/reliability

The server is the real CLI serving the example ONNX model with ONNX Runtime,
in its own process, so its resident memory is measured alone. Clients mix
valid requests (unary and streamed), invalid ones, tight deadlines and
cancellations; beside them 32 scrapers fetch /metrics in a loop, twice the
endpoint's connection bound, so some are refused (503, or a reset) and none
may fail otherwise, and two streams send requests without ever reading their
answers, which the server must stop reading once they hold their bound.
Every valid answer is checked against ONNX Runtime run here on that request's
own input; every stream answer is matched to its request id
exactly once. Nothing may be lost (a valid call that fails), duplicated or
misrouted, the server's memory must stay bounded (and, in a run of a minute or more,
level off), and it must exit 0 on SIGTERM.
Set TRTSERVE_SOAK_REPORT=path.json to keep the numbers.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np
import onnxruntime as ort
import psutil
import pytest

from trtserve.client import AsyncClient, Client, InferenceError
from trtserve.client.convert import infer_request, outputs_of
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc
from trtserve.service.testing.servers import ServerProcess, free_port

CLIENTS = 128
STREAM_CLIENTS = 16  # of the 128, these send bursts over InferStream
SCRAPERS = 32  # /metrics in a loop, a new connection each; the endpoint holds 16
# Streams that send and never read their answers, with 8 KiB ids echoed in each:
# the server must stop reading them (backpressure), not run and hold all they send.
# (At most 1024 answers of ~8 KiB held per stream: small beside the memory bound.)
NON_READERS = 2
NON_READER_ID = "n" * 8192
# What one such stream may get accepted: the server's in-flight bound per stream
# (1024) plus what the HTTP/2 windows hold; without backpressure it was tens of
# thousands in seconds.
NON_READER_MAX_SENT = 4096
SECONDS = float(os.environ.get("TRTSERVE_SOAK_SECONDS", "15"))
MAX_ROWS = 32
# Memory may grow while the process warms up (allocator pools, gRPC buffers,
# bounded stats windows filling); after that it must stay within this bound.
WARMUP_FRACTION = 0.3
RSS_GROWTH_LIMIT = 48 * 2**20
# That warm-up is one or two steps, about 70 MiB in all (102 -> 172 MiB on the 2-core
# machine, every run), which on a loaded machine come anywhere in a short run: after
# the warm-up mark in 5 of 11 runs under load (0 of 4 alone), before 8412890 and after.
# So a short run (CI's 15 s) bounds the growth from the start, and a run of at least
# LEVEL_OFF_MIN_S must also level off after its warm-up.
RSS_CEILING = 112 * 2**20
LEVEL_OFF_MIN_S = 60


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    defects: list[str] = field(default_factory=list)
    valid_latency_s: list[float] = field(default_factory=list)
    rows_answered: int = 0

    def defect(self, what: str) -> None:
        if len(self.defects) < 20:
            self.defects.append(what)
        self.outcomes["DEFECT"] += 1


class Reference:
    """The example model run here, in this process, on one thread."""

    def __init__(self, path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def matches(self, x: np.ndarray, y: np.ndarray) -> bool:
        want = self._session.run(None, {"input": x})[0]
        return y.shape == want.shape and bool(np.allclose(y, want, rtol=1e-4, atol=1e-5))


def _x(rng: random.Random, rows: int) -> np.ndarray:
    # Random inputs: a misrouted answer cannot match by accident.
    seed = rng.getrandbits(32)
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


INVALID = [  # (what, inputs, model, expected status)
    ("dtype", lambda x: {"input": x.astype(np.float64)}, "example",
     grpc.StatusCode.INVALID_ARGUMENT),
    ("shape", lambda x: {"input": x[:, :63]}, "example", grpc.StatusCode.INVALID_ARGUMENT),
    ("rows", lambda x: {"input": np.zeros((MAX_ROWS + 1, 64), np.float32)}, "example",
     grpc.StatusCode.INVALID_ARGUMENT),
    ("name", lambda x: {"inputs": x}, "example", grpc.StatusCode.INVALID_ARGUMENT),
    ("model", lambda x: {"input": x}, "no-such-model", grpc.StatusCode.NOT_FOUND),
]


async def _unary_client(url: str, seed: int, end: float, ref: Reference, tally: Tally) -> None:
    rng = random.Random(seed)
    async with AsyncClient(url) as client, grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        while time.monotonic() < end:
            roll = rng.random()
            x = _x(rng, rng.randint(1, 4))
            if roll < 0.70:
                await _valid(client, x, ref, tally)
            elif roll < 0.85:
                await _invalid(client, rng, x, tally)
            elif roll < 0.95:
                await _tight_deadline(client, rng, x, ref, tally)
            else:
                await _cancelled(stub, rng, x, ref, tally)


async def _valid(client: AsyncClient, x: np.ndarray, ref: Reference, tally: Tally) -> None:
    start = time.monotonic()
    try:
        y = (await client.infer("example", {"input": x}, timeout=60))["output"]
    except InferenceError as e:
        tally.defect(f"valid request failed: {e}")
        return
    tally.valid_latency_s.append(time.monotonic() - start)
    if ref.matches(x, y):
        tally.outcomes["valid ok"] += 1
        tally.rows_answered += x.shape[0]
    else:
        tally.defect("a valid answer does not match its own input")


async def _invalid(client: AsyncClient, rng: random.Random, x: np.ndarray,
                   tally: Tally) -> None:
    what, make, model, code = rng.choice(INVALID)
    try:
        await client.infer(model, make(x), timeout=60)
    except InferenceError as e:
        if e.code == code:
            tally.outcomes[f"invalid {what} refused"] += 1
        else:
            tally.defect(f"invalid {what}: {e.code.name}, expected {code.name}: {e.details}")
    else:
        tally.defect(f"invalid {what} was answered")


async def _tight_deadline(client: AsyncClient, rng: random.Random, x: np.ndarray,
                          ref: Reference, tally: Tally) -> None:
    try:
        y = (await client.infer("example", {"input": x}, timeout=rng.uniform(0.0005, 0.02)))
    except InferenceError as e:
        if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            tally.outcomes["deadline exceeded"] += 1
        else:
            tally.defect(f"tight deadline: {e.code.name}: {e.details}")
        return
    if ref.matches(x, y["output"]):
        tally.outcomes["deadline met"] += 1
        tally.rows_answered += x.shape[0]
    else:
        tally.defect("an answer within a tight deadline does not match its input")


async def _cancelled(stub: pb_grpc.InferenceServiceStub, rng: random.Random, x: np.ndarray,
                     ref: Reference, tally: Tally) -> None:
    call = stub.Infer(infer_request("example", {"input": x}), timeout=60)
    await asyncio.sleep(rng.uniform(0, 0.005))
    call.cancel()
    try:
        response = await call
    except asyncio.CancelledError:
        tally.outcomes["cancelled"] += 1
        return
    except grpc.aio.AioRpcError as e:
        tally.defect(f"cancelled call: {e.code().name}: {e.details()}")
        return
    if ref.matches(x, outputs_of(response)["output"]):
        tally.outcomes["finished before cancel"] += 1
        tally.rows_answered += x.shape[0]
    else:
        tally.defect("an answer to a call cancelled late does not match its input")


async def _stream_client(url: str, seed: int, end: float, ref: Reference, tally: Tally) -> None:
    """Bursts over InferStream; each answer must match its id's input, once."""
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        burst_no = 0
        while time.monotonic() < end:
            burst_no += 1
            sent: dict[str, np.ndarray | None] = {}
            requests = []
            for i in range(rng.randint(2, 12)):
                rid = f"{seed}-{burst_no}-{i}"
                x = _x(rng, rng.randint(1, 4))
                if rng.random() < 0.1:  # an invalid one: its error must not end the stream
                    requests.append(infer_request("example", {"input": x[:, :32]}, None, rid))
                    sent[rid] = None
                else:
                    requests.append(infer_request("example", {"input": x}, None, rid))
                    sent[rid] = x
            try:
                answers = [a async for a in stub.InferStream(iter(requests), timeout=60)]
            except grpc.aio.AioRpcError as e:
                tally.defect(f"stream failed: {e.code().name}: {e.details()}")
                continue
            ids = Counter(a.id for a in answers)
            if ids != Counter(list(sent)):
                tally.defect(f"stream answers {dict(ids)} for requests {list(sent)}")
                continue
            for answer in answers:
                _check_stream_answer(answer, sent[answer.id], ref, tally)


def _check_stream_answer(answer: pb.InferStreamResponse, x: np.ndarray | None, ref: Reference,
                         tally: Tally) -> None:
    if x is None:
        if answer.HasField("error") and \
                answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]:
            tally.outcomes["stream invalid refused"] += 1
        else:
            tally.defect(f"stream: invalid request answered {answer}")
    elif answer.HasField("response") and ref.matches(x, outputs_of(answer.response)["output"]):
        tally.outcomes["stream valid ok"] += 1
        tally.rows_answered += x.shape[0]
    else:
        tally.defect(f"stream answer {answer.id} is not its request's")


async def _scraper(port: int, end: float, tally: Tally) -> None:
    """Scrape /metrics over and over: 200 with the model's metrics, or refused when
    the endpoint already holds its bound of connections (503, or reset at once)."""
    request = b"GET /metrics HTTP/1.1\r\nHost: trtserve\r\nConnection: close\r\n\r\n"
    while time.monotonic() < end:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), 30)
            try:
                writer.write(request)
                data = await asyncio.wait_for(reader.read(), 30)
            finally:
                writer.close()
        except (ConnectionResetError, BrokenPipeError):
            tally.outcomes["scrape refused"] += 1
            continue
        except (OSError, TimeoutError) as e:
            tally.defect(f"scrape failed: {e!r}")
            continue
        if data.startswith(b"HTTP/1.1 200") and b"trtserve_model_requests_total" in data:
            tally.outcomes["scrape ok"] += 1
        elif data.startswith(b"HTTP/1.1 503") or not data:
            tally.outcomes["scrape refused"] += 1
        else:
            tally.defect(f"scrape answered {data[:80]!r}")


async def _non_reader(url: str, end: float, tally: Tally) -> None:
    """Send on one InferStream and never read: writes must stall at the stream's bound."""
    request = infer_request("example", {"input": np.ones((1, 64), np.float32)}, None, "")
    sent = 0
    # No receive-window growth (BDP probing): answers pile up on the server's side.
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(url, options=options) as channel:
        call = pb_grpc.InferenceServiceStub(channel).InferStream()
        while time.monotonic() < end:
            request.id = f"{sent}-{NON_READER_ID}"  # unique: ids in flight may not repeat
            try:
                await asyncio.wait_for(call.write(request), max(0.01, end - time.monotonic()))
            except (TimeoutError, grpc.aio.AioRpcError):
                break
            sent += 1
        call.cancel()
    tally.outcomes["non-reader writes accepted"] += sent
    if sent > NON_READER_MAX_SENT:
        tally.defect(f"a stream that never reads had {sent} requests accepted")


async def _sample_rss(pid: int, end: float, samples: list[tuple[float, int]]) -> None:
    process = psutil.Process(pid)
    start = time.monotonic()
    while time.monotonic() < end:
        samples.append((time.monotonic() - start, process.memory_info().rss))
        await asyncio.sleep(0.5)


def _every(samples: list[tuple[float, int]], step: float) -> list[int]:
    """One sample per `step` seconds, for the report."""
    picked, due = [], 0.0
    for t, value in samples:
        if t >= due:
            picked.append(value)
            due = t + step
    return picked


@pytest.mark.soak
def test_soak(example_onnx, tmp_path):
    metrics_port = free_port()
    server = ServerProcess(["--model", f"example={example_onnx}", "--workers", "2",
                            "--metrics-port", str(metrics_port),
                            "--max-batch-size", str(MAX_ROWS), "--max-queue-delay-us", "2000",
                            "--grace-period-s", "30", "--log-level", "WARNING"])
    tally, rss = Tally(), []
    try:
        server.wait_ready()
        ref = Reference(str(example_onnx))
        began = time.monotonic()
        end = began + SECONDS

        async def soak() -> None:
            clients = [_stream_client(server.url, i, end, ref, tally)
                       if i < STREAM_CLIENTS else _unary_client(server.url, i, end, ref, tally)
                       for i in range(CLIENTS)]
            scrapers = [_scraper(metrics_port, end, tally) for _ in range(SCRAPERS)]
            non_readers = [_non_reader(server.url, end, tally) for _ in range(NON_READERS)]
            await asyncio.gather(_sample_rss(server.proc.pid, end, rss), *clients, *scrapers,
                                 *non_readers)

        asyncio.run(soak())
        elapsed = time.monotonic() - began
        rss.append((elapsed, psutil.Process(server.proc.pid).memory_info().rss))
        with Client(server.url) as c:
            stats = c.stats("example").models[0]
        rc, log = server.terminate()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()

    warm = [r for t, r in rss if t >= SECONDS * WARMUP_FRACTION]
    latency = np.array(tally.valid_latency_s or [0.0])
    report = {
        "seconds": round(elapsed, 1), "clients": CLIENTS, "stream_clients": STREAM_CLIENTS,
        "scrapers": SCRAPERS, "non_readers": NON_READERS,
        "outcomes": dict(sorted(tally.outcomes.items())),
        "calls": sum(tally.outcomes.values()),
        "rows_answered": tally.rows_answered,
        "valid_latency_ms": {p: round(float(np.percentile(latency, q)) * 1e3, 2)
                             for p, q in (("p50", 50), ("p90", 90), ("p99", 99))},
        "server": {"requests": stats.requests, "batches": stats.batches,
                   "inferences": stats.inferences, "mean_batch_size":
                   round(stats.mean_batch_size, 2), "errors": stats.errors,
                   "deadline_exceeded": stats.deadline_exceeded,
                   "cancelled": stats.cancelled, "rejected_queue_full":
                   stats.rejected_queue_full},
        "rss_mib": {"start": round(rss[0][1] / 2**20, 1),
                    "after_warmup": round(warm[0] / 2**20, 1),
                    "max_after_warmup": round(max(warm) / 2**20, 1),
                    "end": round(rss[-1][1] / 2**20, 1),
                    "trend": [round(r / 2**20, 1) for r in _every(rss, SECONDS / 12)]},
        "grpc_execute_batch_errors": log.count("ExecuteBatchError raised in core"),
        "exit_code": rc, "defects": tally.defects,
    }
    print(json.dumps(report, indent=2))
    if os.environ.get("TRTSERVE_SOAK_REPORT"):
        with open(os.environ["TRTSERVE_SOAK_REPORT"], "w") as f:
            json.dump(report, f, indent=2)

    assert not tally.defects, tally.defects
    assert rc == 0, log
    # grpc.aio logs an ExecuteBatchError when it sends an answer to a call its client
    # has just cancelled (or whose deadline just passed); any other error is ours.
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d )", log)
    ours = [r for r in records if " ERROR " in r or "Traceback" in r]
    assert all("ExecuteBatchError raised in core" in r.splitlines()[0] for r in ours), ours[:3]
    assert tally.outcomes["valid ok"] > CLIENTS and tally.outcomes["stream valid ok"] > 0
    for outcome in ("deadline exceeded", "cancelled", "stream invalid refused", "scrape ok",
                    "non-reader writes accepted"):
        assert tally.outcomes[outcome] > 0, (outcome, tally.outcomes)
    # The server ran every answered row (more, for calls abandoned mid-batch), and
    # lost no accepted request to an internal error.
    assert stats.inferences >= tally.rows_answered
    assert stats.errors == 0 and stats.rejected_queue_full == 0
    assert max(r for _, r in rss) - rss[0][1] < RSS_CEILING, report["rss_mib"]
    if SECONDS >= LEVEL_OFF_MIN_S:
        assert max(warm) - warm[0] < RSS_GROWTH_LIMIT, report["rss_mib"]
