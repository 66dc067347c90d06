"""Typed configuration: frozen dataclasses, loaded from TOML, validated at start.

One TOML file may describe the server and every model; command-line flags
override it. Unknown keys and bad values are refused with a message naming
the key and the value received. Every key is documented in docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtserve.service import cpus, open_files
from trtserve.service.errors import ConfigError

BACKENDS = ("auto", "onnxruntime", "tensorrt")
MIB = 1024 * 1024


@dataclass(frozen=True)
class BuildConfig:
    """How to build a TensorRT engine when a model's path is an .onnx file."""

    profiles: int = 1
    batch: str = ""  # "MIN:OPT:MAX"; empty: 1:OPT:max_batch_size (64 if that is 0)
    # Inputs with other dynamic dimensions: "NAME=MIN:OPT:MAX", shapes like 1x3x224x224.
    shapes: tuple[str, ...] = ()
    max_aux_streams: int = -1  # -1: let TensorRT decide
    fp16: bool = False
    bf16: bool = False
    strongly_typed: bool = False
    builder_optimization_level: int = -1
    avg_timing_iterations: int = -1
    timing_cache: str = ""  # empty: <model>.timing-cache next to the model
    mps_percentage: int = 0
    workspace_mib: int = 0  # 0: the library's default
    # fp16/bf16 that the library cannot apply: true builds anyway, in the model's precisions.
    allow_precision_fallback: bool = False
    engine: str = ""  # empty: <model>.engine next to the model

    def __post_init__(self) -> None:
        # The same checks as `trtserve build` flags get (one definition, in
        # build/settings.py); imported here because it imports this module.
        from trtserve.service.build.settings import check_build_config

        check_build_config(self)


# A model's workers and ONNX Runtime threads: far more than any host runs.
MAX_WORKERS = 256
INT32_MAX = 2**31 - 1
MAX_INTRA_OP_THREADS = 1024


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: str
    backend: str = "auto"  # from the file suffix: .onnx -> onnxruntime, .engine/.plan -> tensorrt
    # CPU: sessions; TensorRT: workers (contexts+streams) per optimization profile.
    workers: int = 2
    # 0: the model's own maximum (its profiles' largest batch, or 64 for ONNX).
    max_batch_size: int = 0
    # 0: send what is queued as soon as a worker is free; batches still grow while
    # every worker is busy. A delay trades latency at low load for bigger batches.
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 4096  # requests waiting for a batch; more -> RESOURCE_EXHAUSTED
    max_rows_per_request: int = 0  # 0: max_batch_size
    # Whether requests are stacked along dimension 0 into batches. "auto": when
    # every input and output has a dynamic first dimension (for TensorRT, a
    # batch range in every profile); false: never (Triton's max_batch_size 0),
    # each request runs alone with its full shapes; true: required (a model
    # that cannot batch is refused at start, naming the tensor).
    batching: bool | str = "auto"
    # A batch expected (from the last batch of its size) to run in less than this
    # is quick. It runs on the event loop itself when no other batch of the model
    # is running, sparing the two thread hand-offs, where the executor may run on
    # any thread (ONNX Runtime); elsewhere (TensorRT) it waits for the quick
    # batch in flight rather than take a second worker (ModelRuntime._hold_s).
    # 0: neither.
    inline_below_us: int = 100
    # ONNX Runtime threads per session; 0: (usable cores - 1) / workers, at least 1.
    intra_op_threads: int = 0
    # Let ONNX Runtime's threads spin waiting for work (more CPU, a little less latency).
    intra_op_spinning: bool = False
    device: int = 0  # CUDA device ordinal (TensorRT)
    cuda_graphs: bool = True
    # Batch buckets for CUDA graphs; batches are padded up to a bucket.
    # Empty: powers of two up to max_batch_size.
    graph_batch_sizes: tuple[int, ...] = ()
    # Consecutive failures after which a worker leaves the rotation. Inputs the
    # backend refuses (INVALID_ARGUMENT) are the request's fault and never count.
    max_worker_failures: int = 3
    # A worker out of the rotation is rebuilt after this long, then after twice
    # as long for each rebuild that fails, up to the max; it rejoins on success.
    worker_retry_backoff_s: float = 1.0
    worker_retry_backoff_max_s: float = 60.0
    # The largest input tensor one request may carry, in bytes; 0: no limit. What a
    # request costs is a multiple of its input (activations; docs/reliability.md,
    # "Memory"). 64 MiB still takes 64 images of 3x224x224 FP32 at once.
    max_input_bytes: int = 64 * MIB
    # Per input, the largest size of each dimension (0: no bound), e.g.
    # {"images": (0, 3, 2048, 2048)}: dynamic non-batch dimensions bounded from config.
    max_input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, hash=False)
    # ONNX Runtime's CPU memory arena: it keeps what the largest batch needed, for
    # good. Off, tensors go back to malloc: no slower on small batches, while a batch
    # with temporaries over 32 MiB faults them in on every run, much slower (a conv
    # batch of 8x3x224x224: docs/reliability.md, "Memory").
    cpu_memory_arena: bool = False
    build: BuildConfig = field(default_factory=BuildConfig)

    def __post_init__(self) -> None:
        key = f"models.{self.name}"
        _require(bool(self.name) and self.name.replace("_", "").replace("-", "").replace(
            ".", "").isalnum(), f"{key}.name", self.name,
            "letters, digits, '-', '_' or '.'")
        _require(bool(self.path), f"{key}.path", self.path, "a model file")
        _require(self.backend in BACKENDS, f"{key}.backend", self.backend, f"one of {BACKENDS}")
        # Upper bounds too: each worker is a thread and an executor (a TensorRT context), and
        # a folder's config.toml with workers = 10**20 was taken as it stood.
        _require(1 <= self.workers <= MAX_WORKERS, f"{key}.workers", self.workers,
                 f"1..{MAX_WORKERS}")
        # Triton's max_batch_size is an int32 (ModelConfig): a larger one failed every
        # metadata call (INTERNAL) while the model served.
        _require(0 <= self.max_batch_size <= INT32_MAX, f"{key}.max_batch_size",
                 self.max_batch_size, f"0 (the model's maximum) .. {INT32_MAX}")
        _require(0 <= self.max_rows_per_request <= INT32_MAX, f"{key}.max_rows_per_request",
                 self.max_rows_per_request, f"0 (max_batch_size) .. {INT32_MAX}")
        _require(self.max_queue_delay_us >= 0, f"{key}.max_queue_delay_us",
                 self.max_queue_delay_us, "0 or more")
        _require(all(s >= 1 for s in self.preferred_batch_sizes),
                 f"{key}.preferred_batch_sizes", list(self.preferred_batch_sizes),
                 "sizes of at least 1")
        _require(not self.max_batch_size or all(
            s <= self.max_batch_size for s in self.preferred_batch_sizes),
            f"{key}.preferred_batch_sizes", list(self.preferred_batch_sizes),
            f"sizes of at most max_batch_size ({self.max_batch_size})")
        _require(self.max_queue_size >= 1, f"{key}.max_queue_size", self.max_queue_size,
                 "at least 1")
        _require(self.batching == "auto" or isinstance(self.batching, bool),
                 f"{key}.batching", self.batching, "\"auto\", true or false")
        _require(self.inline_below_us >= 0, f"{key}.inline_below_us", self.inline_below_us,
                 "0 (off) or more")
        _require(0 <= self.intra_op_threads <= MAX_INTRA_OP_THREADS, f"{key}.intra_op_threads",
                 self.intra_op_threads, f"0 (automatic) .. {MAX_INTRA_OP_THREADS}")
        _require(all(s >= 1 for s in self.graph_batch_sizes), f"{key}.graph_batch_sizes",
                 list(self.graph_batch_sizes), "sizes of at least 1")
        _require(self.max_worker_failures >= 1, f"{key}.max_worker_failures",
                 self.max_worker_failures, "at least 1")
        _require(self.worker_retry_backoff_s > 0, f"{key}.worker_retry_backoff_s",
                 self.worker_retry_backoff_s, "more than 0 seconds")
        _require(self.worker_retry_backoff_max_s >= self.worker_retry_backoff_s,
                 f"{key}.worker_retry_backoff_max_s", self.worker_retry_backoff_max_s,
                 f"at least worker_retry_backoff_s ({self.worker_retry_backoff_s})")
        _require(self.max_input_bytes >= 0, f"{key}.max_input_bytes", self.max_input_bytes,
                 "0 (no limit) or more")
        for tensor, dims in self.max_input_shapes.items():
            _require(all(d >= 0 for d in dims), f"{key}.max_input_shapes.{tensor}", list(dims),
                     "sizes of 0 (no bound) or more")

    @property
    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        suffix = Path(self.path).suffix.lower()
        if suffix in (".engine", ".plan", ".trt"):
            return "tensorrt"
        return "onnxruntime"


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""  # set: clients must present a certificate it signed (mTLS)

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    def __post_init__(self) -> None:
        _require(bool(self.cert_file) == bool(self.key_file), "server.tls", "cert/key",
                 "cert_file and key_file together")
        _require(not self.client_ca_file or bool(self.cert_file), "server.tls.client_ca_file",
                 self.client_ca_file, "cert_file and key_file as well")


SYSTEM_REGIONS = ("copy", "in_place")


@dataclass(frozen=True)
class SharedMemoryConfig:
    """Shared-memory tensors (KServe's system and CUDA shared-memory extensions, and
    trtserve.v1's regions): limits on what clients may have the server map."""

    # Regions registered at once, system and CUDA together; more -> RESOURCE_EXHAUSTED.
    max_regions: int = 64
    # Bytes mapped at once over every region; more -> RESOURCE_EXHAUSTED.
    max_mapped_bytes: int = 16 * 1024**3
    # Register RPCs are taken only from loopback and Unix-socket peers: a region is
    # named by a key of this host's /dev/shm (or a CUDA handle of this host's GPU),
    # which a remote caller cannot create. True takes them from any peer (behind a
    # proxy that makes every caller look remote); the token still applies.
    allow_remote_register: bool = False
    # "copy": the engine reads a system region's inputs and writes its outputs through
    # the object's file descriptor (pread/pwrite, one copy each way), so a client that
    # shrinks its object mid-request fails only that request. "in_place": mapped, and
    # executors read and write it where it lies (no copy; pinned for TensorRT), which
    # trusts every client that registers one: shrinking the object while a request uses
    # it kills the engine process (SIGBUS). docs/reliability.md, "Shared memory".
    system_regions: str = "copy"

    def __post_init__(self) -> None:
        _require(self.system_regions in SYSTEM_REGIONS, "server.shared_memory.system_regions",
                 self.system_regions, " or ".join(f'"{m}"' for m in SYSTEM_REGIONS))
        _require(self.max_regions >= 0, "server.shared_memory.max_regions", self.max_regions,
                 "0 (no regions: shared memory off) or more")
        _require(self.max_mapped_bytes >= 0, "server.shared_memory.max_mapped_bytes",
                 self.max_mapped_bytes, "0 or more bytes")


EVENT_LOOPS = ("auto", "uvloop", "asyncio")
MODEL_LOAD_FAILURE = ("exit", "skip")
MAX_FRONTENDS = 64
# "auto" stops here: past it the engine's one event loop, not the frontends, is the limit.
MAX_AUTO_FRONTENDS = 8
# The longest idle time, age or age grace a gRPC connection may be given: 30 days.
MAX_CONNECTION_S = 30 * 24 * 3600
# A frontend's poll for a lone request's reply, where no CPU quota applies.
AUTO_SPIN_US = 1000
# The engine polls for the next request by default ("auto") only on a host of this many
# usable cores: on 2 it competed with the frontends and the client; at 4 and 6 (taskset
# on a 16-core GPU host, session 24) it lowered the cost at concurrency 1 in every pair
# (engine_spin_us).
ENGINE_SPIN_MIN_CORES = 4


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8001
    # For a new gRPC connection to finish its handshake (TLS, then HTTP/2's settings);
    # slower is closed, so connections that never speak cannot pile up (gRPC's own: 120).
    grpc_handshake_timeout_s: float = 10.0
    # A gRPC connection with no call for this long is closed (GOAWAY; the client
    # reconnects when it next calls). 0: never, as gRPC clients keep channels on purpose.
    grpc_max_connection_idle_s: float = 0.0
    # A gRPC connection this old is told to go (GOAWAY), so that clients behind a layer-4
    # load balancer reconnect, and reach new replicas, now and then. Its calls in flight
    # get grpc_max_connection_age_grace_s to finish, then are cut (streams too). 0: never.
    grpc_max_connection_age_s: float = 0.0
    grpc_max_connection_age_grace_s: float = 30.0
    # gRPC connections one process holds at once (each frontend process: its own, as the
    # kernel spreads connections by hash); one more is closed as it opens. Each idle one
    # holds about 14 KB and a file: without a cap, a client opening connections in a loop
    # can take the server's memory or files. Lowered at start to what the open-file limit
    # leaves (open_files.connection_cap). 0: that limit's room alone.
    grpc_max_connections: int = 10_000
    metrics_port: int = 8002  # 0: no Prometheus endpoint
    # KServe v2 over HTTP/REST (the same models, auth, TLS and limits); 0: off.
    http_port: int = 8000
    # HTTP connections one process holds at once (each frontend process: its own);
    # one more is answered 503 and closed.
    http_max_connections: int = 1024
    # To send a request's headers once their first byte came, and to finish TLS;
    # slower: 408 and closed (slow-headers clients cannot hold a connection).
    http_header_timeout_s: float = 10.0
    # A connection with no request in it (since it opened or its last answer) is closed.
    http_keepalive_timeout_s: float = 60.0
    # The longest wait for the next bytes of a request's body; slower: 408 and closed.
    http_body_timeout_s: float = 30.0
    # The JSON part of an HTTP inference body (all of it without binary tensors), after
    # any Content-Encoding; larger: 413. Parsing holds the process's event loop (about
    # 0.5 s for 8 MiB of small integers on a 2-core machine); large tensors go as
    # binary data or through shared memory.
    http_max_json_bytes: int = 8 * 1024 * 1024
    # Its own address: loopback unless a scraper elsewhere must reach it (then
    # metrics_requires_auth, TLS, or a NetworkPolicy).
    metrics_host: str = "127.0.0.1"
    metrics_requires_auth: bool = False  # the gRPC bearer token, as `Authorization: Bearer`
    metrics_tls: bool = False  # HTTPS with server.tls's cert and key (and client CA: mTLS)
    # Connections held at once; one more is answered 503 and closed.
    metrics_max_connections: int = 16
    # To send a request's headers, to take the response, idle keep-alive, TLS handshake.
    metrics_timeout_s: float = 5.0
    # Scrapes within this share one render; 0: every scrape renders (concurrent ones share).
    metrics_render_interval_s: float = 1.0
    grace_period_s: float = 30.0  # drain time on SIGTERM before in-flight work is abandoned
    max_receive_message_bytes: int = 256 * 1024 * 1024
    max_send_message_bytes: int = 256 * 1024 * 1024
    # HTTP/2 streams one connection may have open; a client's further calls wait for one
    # (gRPC clients queue them). With gRPC's overload protection a stream counts until the
    # server is done with it, so this also bounds what one connection that opens streams
    # and resets them at once (HTTP/2 "rapid reset") can queue: without a limit, one such
    # connection filled max_pending_calls and other clients' calls failed CANCELLED
    # (docs/reliability.md, "Connections"). 0: gRPC's default, unlimited.
    max_concurrent_streams: int = 1024
    # Calls gRPC has received that the serving loop has not yet taken (a grpc.aio server
    # takes one at a time, so a busy loop leaves them waiting in gRPC's C core). gRPC's own
    # limit, 1,000 to 3,000 at random, fails the rest with CANCELLED: at 1,024 concurrent
    # clients on one process it failed about 1% of calls (docs/reliability.md, "Bursts of
    # calls"). Past this limit gRPC still fails them so. 0: gRPC's own.
    max_pending_calls: int = 16384
    # gRPC calls one process serves at once, over every connection and method (a stream
    # counts one), from their headers on: a call whose message has not come yet holds
    # about 20 KB, and gRPC reads a unary call's message before any handler runs, so
    # without this a client could open calls and never send them until the memory is
    # gone. One more is RESOURCE_EXHAUSTED at once (grpc.aio's maximum_concurrent_rpcs).
    # 0: no limit.
    max_calls_in_flight: int = 16384
    # What one InferStream / ModelStreamInfer may hold before it stops reading:
    # requests read whose answer has not been sent, and bytes of answers not sent.
    max_in_flight_per_stream: int = 1024
    max_unsent_bytes_per_stream: int = 64 * 1024 * 1024
    # Bytes of answers (64 KiB or more each) running or not read yet by their clients
    # (an HTTP/2 window shut), over all calls and streams of one connection, and over the
    # whole process (each frontend its own): at a limit, requests with large answers are
    # refused before they run; an answer past twice it is not sent (frontends/unsent.py).
    max_unsent_bytes_per_connection: int = 256 * 1024 * 1024
    max_unsent_bytes: int = 1024 * 1024 * 1024
    stats_window_s: float = 10.0
    auth_token_file: str = ""  # or the TRTSERVE_AUTH_TOKEN environment variable
    health_requires_auth: bool = False
    # "uvloop" (libuv's event loop: less Python per call) where it is installed,
    # else "asyncio"; "auto" picks.
    event_loop: str = "auto"
    # The garbage collector's first threshold in the serving process (the engine's, or
    # the one process): a young-generation collection after this many new container
    # objects. Python's 700 makes it collect every few dozen requests, about a tenth of
    # the engine loop's CPU with small requests (docs/processes.md, "The engine loop");
    # the cycles it misses meanwhile wait a little longer. 0: Python's own threshold.
    gc_gen0_threshold: int = 20_000
    # Bytes of input tensors held by accepted requests until they are answered, over
    # every model, protocol and stream; more -> RESOURCE_EXHAUSTED. 0: no budget.
    max_request_bytes_in_flight: int = 1024 * MIB
    # glibc: allocations of at least this many bytes get their own mapping, returned to
    # the system when freed. 0: glibc's own threshold, which rises with the blocks freed
    # up to 32 MiB. Lower keeps less resident between requests but costs page faults on
    # every large temporary, several times slower (docs/reliability.md, "Memory").
    malloc_mmap_threshold_bytes: int = 0
    # After a request whose inputs held at least this many bytes, glibc's free memory
    # is given back to the system (malloc_trim, off the event loop). 0: never.
    trim_after_request_bytes: int = 4 * MIB
    tls: TlsConfig = field(default_factory=TlsConfig)
    shared_memory: SharedMemoryConfig = field(default_factory=SharedMemoryConfig)
    # A model that fails to load at start: "exit" stops the server (exit code 2),
    # "skip" serves the others and reports that one NOT_SERVING with its reason.
    model_load_failure: str = "exit"
    # Clients may load, unload and reload models at run time (KServe's repository
    # RPCs, trtserve.v1's LoadModel/UnloadModel/ReloadModel); the token applies when
    # auth is on. Off: those RPCs answer PERMISSION_DENIED; RepositoryIndex still answers.
    model_control: bool = True
    # A folder of models, served at start (Triton's layout: DIR/<name>/<version>/
    # model.onnx|model.plan|model.engine, optionally DIR/<name>/config.toml; or flat
    # DIR/<name>.onnx; engine/folder.py). "": none, the [[models]] alone.
    model_repository: str = ""
    # Every this many seconds, each served model's file is checked (size and mtime,
    # off the event loop) and the model reloaded once a change has settled; with a
    # model_repository, its folder is followed too (models added, changed, removed;
    # Triton's poll mode). 0: off (the folder is read at start only).
    model_watch_interval_s: float = 0.0
    # Processes that accept gRPC on the port: 1 serves everything in one process;
    # N > 1 runs the engine in the main process and N frontend processes
    # (docs/processes.md). "auto": 1 on a host of 2 usable cores or fewer, else
    # half the usable cores, at most MAX_AUTO_FRONTENDS.
    frontends: int | str = "auto"
    # Shared memory for each frontend's large tensors, each way (allocated as used).
    frontend_arena_mib: int = 64
    # A frontend with one request at the engine and nothing else to do keeps its
    # loop polling for up to this long rather than sleeping, so that the reply is
    # read at once, on a warm core (docs/processes.md, "Concurrency 1"). 0: off.
    # "auto": AUTO_SPIN_US, or off under a CPU quota, where a poll spends the share of
    # CPU time every process of the server is throttled by.
    frontend_spin_us: int | str = "auto"
    # The engine's side of the same: once a frontend has nothing in flight, the engine's
    # loop polls for the next frame from any frontend for up to this long, so that the
    # next request at concurrency 1 is read on a warm core. "auto": AUTO_SPIN_US on a
    # host of at least ENGINE_SPIN_MIN_CORES usable cores, else off (and off under a CPU
    # quota). On 16-core GPU hosts it lowered the p50 cost of 8 frontends at concurrency
    # 1 in 9 of 10 side-by-side pairs (by 54 us at the median; the p90 too) for 0.4 of a
    # core, and of 2 frontends on 4 and 6 of those cores in all 4 pairs; on the 2-core
    # machine, where the pollers and the client share 2 cores, it raised the p90
    # (docs/processes.md, "Concurrency 1").
    engine_spin_us: int | str = "auto"
    # While the engine reports a model's backlog (a batch waiting for a worker, requests
    # queued behind it), a frontend holds the frame of its requests up to this long so that
    # it carries more of them: the engine's loop pays per frame, and those requests
    # wait longer than this anyway (docs/processes.md, "Frames held"; 2 ms served more
    # rows than 1 ms on the GPU host and cost the engine's loop less on the CPU doubles:
    # "Session 17"). 0: off.
    frontend_hold_us: int = 2000
    # The CPUs the engine's threads run on (its event loop, workers, ONNX Runtime's and
    # gRPC's threads), as a Linux CPU list ("15", "14-15"); the frontends then run on the
    # other cores this process may use. With one process, the whole server runs on them.
    # "": wherever the kernel puts them (service/cpus.py; docs/processes-measured.md, "Session 18").
    engine_cpus: str = ""
    models: tuple[ModelConfig, ...] = ()

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "server.port", self.port, "0..65535")
        _require(0 <= self.metrics_port <= 65535, "server.metrics_port", self.metrics_port,
                 "0 (off) .. 65535")
        _require(not self.metrics_port or self.metrics_port != self.port,
                 "server.metrics_port", self.metrics_port,
                 f"a port other than server.port ({self.port}), or 0 (off)")
        _require(0 <= self.http_port <= 65535, "server.http_port", self.http_port,
                 "0 (off) .. 65535")
        _require(not self.http_port or self.http_port not in (self.port, self.metrics_port),
                 "server.http_port", self.http_port,
                 f"a port other than server.port ({self.port}) and server.metrics_port "
                 f"({self.metrics_port}), or 0 (off)")
        _require(1 <= self.http_max_connections <= 1_000_000, "server.http_max_connections",
                 self.http_max_connections, "1..1000000")
        _require(1024 <= self.http_max_json_bytes <= 1 << 30, "server.http_max_json_bytes",
                 self.http_max_json_bytes, "1024..1073741824")
        _require(0 <= self.grpc_max_connections <= 1_000_000, "server.grpc_max_connections",
                 self.grpc_max_connections, "0 (the open-file limit's room alone) .. 1000000")
        for key in ("grpc_max_connection_idle_s", "grpc_max_connection_age_s",
                    "grpc_max_connection_age_grace_s"):
            _require(0 <= getattr(self, key) <= MAX_CONNECTION_S, f"server.{key}",
                     getattr(self, key), f"0 (never) .. {MAX_CONNECTION_S} seconds")
        for key in ("grpc_handshake_timeout_s", "http_header_timeout_s",
                    "http_keepalive_timeout_s", "http_body_timeout_s"):
            _require(0 < getattr(self, key) <= 3600, f"server.{key}", getattr(self, key),
                     "more than 0 and at most 3600 seconds")
        _require(bool(self.metrics_host), "server.metrics_host", self.metrics_host,
                 "an address such as 127.0.0.1 (loopback) or 0.0.0.0 (every IPv4 interface)")
        _require(not self.metrics_tls or self.tls.enabled, "server.metrics_tls",
                 self.metrics_tls, "server.tls.cert_file and key_file as well")
        _require(1 <= self.metrics_max_connections <= 10_000, "server.metrics_max_connections",
                 self.metrics_max_connections, "1..10000")
        _require(0 < self.metrics_timeout_s <= 600, "server.metrics_timeout_s",
                 self.metrics_timeout_s, "more than 0 and at most 600 seconds")
        _require(0 <= self.metrics_render_interval_s <= 60, "server.metrics_render_interval_s",
                 self.metrics_render_interval_s, "0 (every scrape) .. 60 seconds")
        _require(self.grace_period_s >= 0, "server.grace_period_s", self.grace_period_s,
                 "0 or more")
        for key in ("max_receive_message_bytes", "max_send_message_bytes"):
            _require(getattr(self, key) >= 1024, f"server.{key}", getattr(self, key),
                     "at least 1024")
        _require(self.max_concurrent_streams >= 0, "server.max_concurrent_streams",
                 self.max_concurrent_streams, "0 (gRPC's default: unlimited) or more")
        _require(self.max_pending_calls >= 0, "server.max_pending_calls",
                 self.max_pending_calls, "0 (gRPC's own) or more")
        _require(0 <= self.max_calls_in_flight <= 10_000_000, "server.max_calls_in_flight",
                 self.max_calls_in_flight, "0 (no limit) .. 10000000")
        _require(self.max_in_flight_per_stream >= 1, "server.max_in_flight_per_stream",
                 self.max_in_flight_per_stream, "1 or more")
        _require(self.max_unsent_bytes_per_stream >= 1, "server.max_unsent_bytes_per_stream",
                 self.max_unsent_bytes_per_stream, "1 or more")
        for key in ("max_unsent_bytes_per_connection", "max_unsent_bytes"):
            _require(getattr(self, key) >= 1 << 20, f"server.{key}", getattr(self, key),
                     "1 MiB or more")
        _require(self.stats_window_s > 0, "server.stats_window_s", self.stats_window_s,
                 "more than 0")
        for key in ("max_request_bytes_in_flight", "malloc_mmap_threshold_bytes",
                    "trim_after_request_bytes", "gc_gen0_threshold"):
            _require(getattr(self, key) >= 0, f"server.{key}", getattr(self, key),
                     "0 (off) or more")
        _require(self.event_loop in EVENT_LOOPS, "server.event_loop", self.event_loop,
                 " or ".join(repr(e) for e in EVENT_LOOPS))
        _require(self.model_load_failure in MODEL_LOAD_FAILURE, "server.model_load_failure",
                 self.model_load_failure, " or ".join(repr(e) for e in MODEL_LOAD_FAILURE))
        _require(self.model_watch_interval_s >= 0, "server.model_watch_interval_s",
                 self.model_watch_interval_s, "0 (off) or more seconds")
        _require(_auto_or_in(self.frontends, 1, MAX_FRONTENDS),
                 "server.frontends", self.frontends, f"'auto' or 1..{MAX_FRONTENDS}")
        _require(1 <= self.frontend_arena_mib <= 65536, "server.frontend_arena_mib",
                 self.frontend_arena_mib, "1..65536")
        for key in ("frontend_spin_us", "engine_spin_us"):
            _require(_auto_or_in(getattr(self, key), 0, 100_000), f"server.{key}",
                     getattr(self, key), "'auto' or 0..100000")
        _require(0 <= self.frontend_hold_us <= 100_000, "server.frontend_hold_us",
                 self.frontend_hold_us, "0..100000")
        _require(not self.engine_cpus or cpus.is_list(self.engine_cpus), "server.engine_cpus",
                 self.engine_cpus, f"{cpus.EXAMPLES}, or '' (the kernel places it)")
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        _require(not dupes, "models.name", dupes, "unique model names")


    @property
    def resolved_frontends(self) -> int:
        """The number of frontend processes `frontends` means on this host."""
        if isinstance(self.frontends, int):
            return self.frontends
        cores = cpus.usable()
        return 1 if cores <= 2 else min(MAX_AUTO_FRONTENDS, cores // 2)

    @property
    def resolved_grpc_max_connections(self) -> int:
        """The gRPC connections one process holds at most, under this process's open-file
        limit (open_files.connection_cap)."""
        return open_files.connection_cap(
            self.grpc_max_connections, self.http_max_connections if self.http_port else 0)

    @property
    def resolved_frontend_spin_us(self) -> int:
        """How long a frontend polls for a lone request's reply on this host."""
        return _spin_us(self.frontend_spin_us)

    @property
    def resolved_engine_spin_us(self) -> int:
        """How long the engine polls for the next frame once a frontend is idle."""
        if self.engine_spin_us == "auto" and cpus.usable() < ENGINE_SPIN_MIN_CORES:
            return 0
        return _spin_us(self.engine_spin_us)


def _spin_us(setting: int | str) -> int:
    """A poll's budget: as set, or for "auto" AUTO_SPIN_US, 0 under a CPU quota."""
    if isinstance(setting, int):
        return setting
    return 0 if cpus.cpu_quota() is not None else AUTO_SPIN_US


def _auto_or_in(value: object, low: int, high: int) -> bool:
    """"auto", or a whole number (not a bool) from `low` to `high`."""
    return value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                               and low <= value <= high)


def _require(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}, expected {expected}")


# --- loading -----------------------------------------------------------------


def from_mapping(cls: type[Any], data: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a TOML table, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    values = {name: _coerce(hints[name], value, f"{where}.{name}")
              for name, value in data.items()}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return from_mapping(hint, value, key)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        key_type, value_type = typing.get_args(hint)
        return {_coerce(key_type, k, key): _coerce(value_type, v, f"{key}.{k}")
                for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        # A value of any one of the member types (`bool | str`), taken as it is.
        members = typing.get_args(hint)
        if not all(isinstance(m, type) and not dataclasses.is_dataclass(m) and
                   typing.get_origin(m) is None for m in members):
            raise ConfigError(f"{key}: unsupported type {hint}")
        if any(isinstance(value, m) and not (m is int and isinstance(value, bool))
               for m in members):
            return value
        raise ConfigError(f"{key}: expected {' or '.join(m.__name__ for m in members)}, "
                          f"got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is an int in Python; refuse `workers = true`.
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def load_toml(path: str | Path) -> ServerConfig:
    """Parse a config file: a [server] table and an array of [[models]] tables."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    unknown = sorted(set(data) - {"server", "models"})
    if unknown:
        raise ConfigError(f"config file {path}: unknown table(s) {unknown}; "
                          "expected [server] and [[models]]")
    server = data.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError("server: expected one [server] table, got "
                          f"{'[[server]] tables' if isinstance(server, list) else repr(server)}")
    server = dict(server)
    if "models" in server:
        raise ConfigError("server.models: models are [[models]] tables, not a server key")
    models = data.get("models", [])
    if not isinstance(models, list):
        raise ConfigError("models: expected [[models]] tables")
    server["models"] = [
        from_mapping(ModelConfig, m, f"models[{i}]") if isinstance(m, dict)
        else _bad_model(i, m) for i, m in enumerate(models)
    ]
    server["models"] = tuple(server["models"])
    hints = {k: v for k, v in server.items() if k != "models"}
    built = from_mapping(ServerConfig, hints, "server")
    return dataclasses.replace(built, models=server["models"])


def _bad_model(index: int, value: object) -> ModelConfig:
    raise ConfigError(f"models[{index}]: expected a table, got {value!r}")
