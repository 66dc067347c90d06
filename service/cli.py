"""`trtserve`: serve models, build and inspect TensorRT engines, profile a backend."""

from __future__ import annotations

# First, before any module imports grpc: it sets what gRPC's C core reads as grpc loads.
from trtserve.client import grpc_tuning  # noqa: F401  # isort: skip

import argparse
import asyncio
import dataclasses
import logging
import sys

from trtserve.client.arg_types import auto_or_int, batching_mode, int_list, name_path
from trtserve.service import cpus, open_files
from trtserve.service.build.settings import FLAGS as BUILD_FLAGS
from trtserve.service.build.settings import add_build_flags, build_overrides
from trtserve.service.config import (
    EVENT_LOOPS,
    MODEL_LOAD_FAILURE,
    SYSTEM_REGIONS,
    ModelConfig,
    ServerConfig,
    load_toml,
)
from trtserve.service.errors import ConfigError, StartError, first_line
from trtserve.service.version import version

log = logging.getLogger("trtserve")

# Flags that override a key of every model's config (flag dest == config key).
MODEL_FLAGS = ("backend", "workers", "max_batch_size", "max_queue_delay_us",
               "preferred_batch_sizes", "max_queue_size", "max_rows_per_request",
               "inline_below_us", "intra_op_threads", "intra_op_spinning", "cuda_graphs",
               "device", "batching", "max_input_bytes", "cpu_memory_arena")
# Flags --shm-KEY that override server.shared_memory.KEY.
SHARED_MEMORY_FLAGS = ("max_regions", "max_mapped_bytes", "allow_remote_register",
                       "system_regions")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SERVER_FLAGS = ("host", "port", "grpc_handshake_timeout_s", "grpc_max_connections",
                "grpc_max_connection_idle_s",
                "grpc_max_connection_age_s", "grpc_max_connection_age_grace_s", "http_port",
                "http_max_connections", "http_header_timeout_s",
                "http_keepalive_timeout_s", "http_body_timeout_s",
                "http_max_json_bytes", "metrics_port", "metrics_host",
                "metrics_requires_auth", "metrics_tls", "metrics_max_connections",
                "metrics_timeout_s", "metrics_render_interval_s", "grace_period_s",
                "auth_token_file", "health_requires_auth", "event_loop", "gc_gen0_threshold",
                "max_receive_message_bytes", "max_send_message_bytes",
                "max_concurrent_streams", "max_pending_calls", "max_calls_in_flight",
                "model_load_failure",
                "max_request_bytes_in_flight", "malloc_mmap_threshold_bytes",
                "trim_after_request_bytes", "max_in_flight_per_stream",
                "max_unsent_bytes_per_stream", "max_unsent_bytes_per_connection",
                "max_unsent_bytes", "model_control", "model_watch_interval_s",
                "model_repository",
                "frontends", "frontend_arena_mib", "frontend_spin_us", "frontend_hold_us",
                "engine_spin_us", "engine_cpus")


def add_serve(sub: argparse._SubParsersAction) -> None:
    # No abbreviations: `--auth-token SECRET` must not pass for `--auth-token-file`
    # (the secret would be visible in `ps` and echoed in the error).
    p = sub.add_parser("serve", help="serve models over gRPC (trtserve.v1 and KServe v2)",
                       allow_abbrev=False)
    p.add_argument("--model", action="append", type=name_path, default=[],
                   metavar="NAME=PATH", help="a model to serve (.onnx, .engine); repeatable")
    p.add_argument("--config", help="TOML file describing the server and models")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 8002; 0 = off)")
    p.add_argument("--metrics-host",
                   help="address the Prometheus port binds (default 127.0.0.1, not --host)")
    p.add_argument("--metrics-requires-auth", action=argparse.BooleanOptionalAction,
                   default=None, help="scrapes need the bearer token (default no)")
    p.add_argument("--metrics-tls", action=argparse.BooleanOptionalAction, default=None,
                   help="serve metrics over HTTPS with --tls-cert/--tls-key (default no)")
    p.add_argument("--metrics-max-connections", type=int,
                   help="scrape connections held at once; more get 503 (default 16)")
    p.add_argument("--metrics-timeout-s", type=float,
                   help="to send a scrape's headers, take its response, or sit idle "
                        "(default 5)")
    p.add_argument("--metrics-render-interval-s", type=float,
                   help="scrapes within it share one render (default 1; 0 = every scrape)")
    p.add_argument("--http-port", type=int,
                   help="KServe v2 HTTP/REST port (default 8000; 0 = off)")
    p.add_argument("--http-max-connections", type=int,
                   help="HTTP connections each process holds at once; more get 503 "
                        "(default 1024)")
    p.add_argument("--grpc-handshake-timeout-s", type=float,
                   help="for a new gRPC connection to finish its handshake (TLS, HTTP/2 "
                        "settings); slower is closed (default 10)")
    p.add_argument("--grpc-max-connections", type=int,
                   help="gRPC connections each process holds at once; one more is closed "
                        "as it opens (default 10000, lowered to fit the open-file limit; "
                        "0 = that limit alone)")
    p.add_argument("--grpc-max-connection-idle-s", type=float,
                   help="close a gRPC connection with no call for this long (default 0: "
                        "never)")
    p.add_argument("--grpc-max-connection-age-s", type=float,
                   help="tell a gRPC connection this old to reconnect, so that clients "
                        "behind a layer-4 load balancer spread again (default 0: never)")
    p.add_argument("--grpc-max-connection-age-grace-s", type=float,
                   help="an aged connection's calls get this long to finish, then are "
                        "cut (default 30)")
    p.add_argument("--http-header-timeout-s", type=float,
                   help="to send a request's headers or finish TLS; slower gets 408 "
                        "(default 10)")
    p.add_argument("--http-keepalive-timeout-s", type=float,
                   help="an HTTP connection with no request in it is closed (default 60)")
    p.add_argument("--http-body-timeout-s", type=float,
                   help="the longest wait for the next bytes of an HTTP request body; "
                        "slower gets 408 (default 30)")
    p.add_argument("--http-max-json-bytes", type=int,
                   help="the JSON part of an HTTP inference body; larger gets 413 (default "
                        "8 MiB; large tensors go as binary data)")
    p.add_argument("--grace-period-s", type=float, help="drain time on SIGTERM (default 30)")
    p.add_argument("--auth-token-file", help="file holding the bearer token clients must send")
    p.add_argument("--health-requires-auth", action=argparse.BooleanOptionalAction,
                   default=None, help="health checks need the token too (default no)")
    p.add_argument("--event-loop", choices=EVENT_LOOPS,
                   help="uvloop (default where installed) or asyncio's own")
    p.add_argument("--gc-gen0-threshold", type=int,
                   help="young garbage collections after this many new containers "
                        "(default 20000; 0: Python's 700)")
    p.add_argument("--max-receive-message-bytes", type=int,
                   help="largest request accepted, gRPC message or HTTP body "
                   "(default 256 MiB)")
    p.add_argument("--max-send-message-bytes", type=int,
                   help="largest response sent (default 256 MiB)")
    p.add_argument("--max-concurrent-streams", type=int,
                   help="HTTP/2 streams per connection; more calls wait (default 1024; "
                        "0 = gRPC's own, unlimited)")
    p.add_argument("--max-pending-calls", type=int,
                   help="calls received that the server's loop has not yet taken; gRPC "
                        "fails more with CANCELLED (default 16384, 0 = gRPC's own: "
                        "1,000-3,000)")
    p.add_argument("--max-calls-in-flight", type=int,
                   help="gRPC calls each process serves at once, from their headers on "
                        "(a stream counts one); one more is RESOURCE_EXHAUSTED at once "
                        "(default 16384, 0 = no limit)")
    p.add_argument("--max-request-bytes-in-flight", type=int,
                   help="input bytes of accepted requests not yet answered, over the whole "
                        "server; more are refused (default 1 GiB, 0 = no budget)")
    p.add_argument("--malloc-mmap-threshold-bytes", type=int,
                   help="glibc: blocks this large get their own mapping, returned when freed "
                        "(default 0: glibc's own, up to 32 MiB)")
    p.add_argument("--trim-after-request-bytes", type=int,
                   help="give free memory back to the system after a request with this many "
                        "input bytes (default 4 MiB, 0 = never)")
    p.add_argument("--max-in-flight-per-stream", type=int,
                   help="requests in flight on one stream before it stops reading (default 1024)")
    p.add_argument("--max-unsent-bytes-per-stream", type=int,
                   help="answer bytes not yet sent on one stream before it stops reading "
                        "(default 64 MiB)")
    p.add_argument("--max-unsent-bytes-per-connection", type=int,
                   help="answer bytes a connection has not read (all its calls and "
                        "streams); an answer past it is not sent: RESOURCE_EXHAUSTED "
                        "(default 256 MiB)")
    p.add_argument("--max-unsent-bytes", type=int,
                   help="answer bytes not read or being computed over the whole process; "
                        "past it, requests with large answers are refused "
                        "(default 1 GiB)")
    p.add_argument("--tls-cert", help="server certificate (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA (PEM) that client certificates must chain to")
    p.add_argument("--shm-max-regions", type=int,
                   help="shared-memory regions registered at once (default 64; 0 = shared "
                        "memory off)")
    p.add_argument("--shm-max-mapped-bytes", type=int,
                   help="bytes mapped over every shared-memory region (default 16 GiB)")
    p.add_argument("--shm-allow-remote-register", action="store_true", default=None,
                   help="take shared-memory register calls from any peer, not only loopback "
                        "and Unix sockets (e.g. behind a local proxy)")
    p.add_argument("--shm-system-regions", choices=SYSTEM_REGIONS,
                   help="copy (default): read and write clients' system shared-memory "
                        "regions with pread/pwrite, so a client that shrinks its object "
                        "fails only its request; in_place: map them, no copy, for clients "
                        "you trust (one that shrinks its object mid-request crashes the "
                        "engine)")
    p.add_argument("--frontends", type=auto_or_int, metavar="{auto,N}",
                   help="processes accepting gRPC on the port: 1 serves everything in one "
                        "process; N > 1 runs the engine in the main process and N frontend "
                        "processes (default auto: 1 on 2 cores or fewer, else half the cores, "
                        "at most 8)")
    p.add_argument("--frontend-arena-mib", type=int,
                   help="shared memory for each frontend's large tensors, each way "
                        "(default 64; allocated as used)")
    p.add_argument("--frontend-spin-us", type=auto_or_int, metavar="{auto,US}",
                   help="a frontend waiting on the engine for its only request polls for "
                        "up to this long before sleeping (default auto: 1000, or 0 under a "
                        "CPU quota; 0: off)")
    p.add_argument("--engine-spin-us", type=auto_or_int, metavar="{auto,US}",
                   help="once a frontend has nothing in flight, the engine polls for the "
                        "next request for up to this long before sleeping (default auto: "
                        "1000 on a host of 8 usable cores or more, else 0; 0 under a CPU "
                        "quota; 0: off)")
    p.add_argument("--frontend-hold-us", type=int,
                   help="while a model has a backlog at the engine, a frontend holds the "
                        "frame of its requests up to this long to carry more (default 2000; "
                        "0: off)")
    p.add_argument("--engine-cpus", metavar="CPUS",
                   help="run the engine's threads on these CPUs (a list such as 15 or "
                        "14-15) and the frontends on the other cores (default: where the "
                        "kernel puts them)")
    p.add_argument("--model-load-failure", choices=MODEL_LOAD_FAILURE,
                   help="a model that fails to load: exit (default) stops the server, skip "
                        "serves the others")
    p.add_argument("--model-control", action=argparse.BooleanOptionalAction, default=None,
                   help="clients may load, unload and reload models at run time (KServe "
                        "repository RPCs, trtserve.v1 LoadModel/...; default yes)")
    p.add_argument("--model-repository", metavar="DIR",
                   help="serve the models of a folder: DIR/NAME/VERSION/model.onnx (or "
                        "model.plan, model.engine), optionally DIR/NAME/config.toml, or "
                        "DIR/NAME.onnx (docs/configuration.md)")
    p.add_argument("--model-watch-interval-s", type=float,
                   help="reload a model when its file changes, and follow --model-repository "
                        "(models added, changed, removed), checked this often "
                        "(default 0 = no watching)")
    g = p.add_argument_group("model settings (override the config file for every model)")
    g.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"))
    g.add_argument("--workers", type=int,
                   help="ONNX sessions, or TensorRT workers per optimization profile")
    g.add_argument("--max-batch-size", type=int)
    g.add_argument("--max-queue-delay-us", type=int)
    g.add_argument("--preferred-batch-sizes", type=int_list, metavar="N,N,...")
    g.add_argument("--max-queue-size", type=int)
    g.add_argument("--max-rows-per-request", type=int)
    g.add_argument("--batching", type=batching_mode, metavar="{auto,on,off}",
                   help="stack requests into batches along dimension 0: auto (when every "
                        "tensor's first dimension is dynamic), on (required) or off "
                        "(each request runs alone, as Triton's max_batch_size 0)")
    g.add_argument("--inline-below-us", type=int,
                   help="a batch expected to take less is quick: ONNX Runtime runs it on the "
                        "event loop when the model is otherwise idle, TensorRT holds it for "
                        "the quick batch in flight (default 100, 0 = neither)")
    g.add_argument("--intra-op-threads", type=int,
                   help="ONNX Runtime threads per session (default 0: the usable cores less "
                        "one, split between the workers)")
    g.add_argument("--intra-op-spinning", action=argparse.BooleanOptionalAction, default=None,
                   help="ONNX Runtime threads spin waiting for work (default no)")
    g.add_argument("--max-input-bytes", type=int,
                   help="largest input tensor of one request (default 64 MiB, 0 = no limit)")
    g.add_argument("--cpu-memory-arena", action=argparse.BooleanOptionalAction, default=None,
                   help="ONNX Runtime's CPU memory arena, which keeps what the largest batch "
                        "needed (default no)")
    g.add_argument("--device", type=int, help="CUDA device ordinal")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None)
    b = p.add_argument_group(
        "engine build (an .onnx model served with --backend tensorrt; the same flags as "
        "`trtserve build`, overriding [models.build] for every model)")
    add_build_flags(b)
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="INFO by default; DEBUG also prints the traceback of a start error")
    p.set_defaults(func=run_serve)


def build_config(args: argparse.Namespace) -> ServerConfig:
    """The config file (if any), the --model flags, then flag overrides."""
    config = load_toml(args.config) if args.config else ServerConfig()
    models = list(config.models)
    known = {m.name for m in models}
    for name, path in args.model:
        if name in known:
            models = [dataclasses.replace(m, path=path) if m.name == name else m for m in models]
        else:
            models.append(ModelConfig(name=name, path=path))
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    models = [dataclasses.replace(m, **overrides) for m in models]
    build = build_overrides(args)
    if build:
        models = [dataclasses.replace(m, build=dataclasses.replace(m.build, **build))
                  for m in models]
    server = {k: getattr(args, k) for k in SERVER_FLAGS if getattr(args, k) is not None}
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        server["tls"] = dataclasses.replace(
            config.tls, cert_file=args.tls_cert or config.tls.cert_file,
            key_file=args.tls_key or config.tls.key_file,
            client_ca_file=args.tls_client_ca or config.tls.client_ca_file)
    shm = {key: getattr(args, f"shm_{key}") for key in SHARED_MEMORY_FLAGS
           if getattr(args, f"shm_{key}") is not None}
    if shm:
        server["shared_memory"] = dataclasses.replace(config.shared_memory, **shm)
    config = dataclasses.replace(config, models=tuple(models), **server)
    if config.model_repository and (overrides or build):
        # The folder's models are read later, each with its own config.toml.
        log.warning("%s set every model's setting for --model and [[models]] models only; "
                    "the models of the repository folder %s take theirs from "
                    "NAME/config.toml there", ", ".join(
                        [*("--" + k.replace("_", "-") for k in overrides),
                         *(f.flag for f in BUILD_FLAGS if f.field in build)]),
                    config.model_repository)
    if not config.models and not config.model_repository:
        raise ConfigError("no models: pass --model NAME=PATH, --model-repository DIR or a "
                          "--config file with [[models]]")
    return config


def run_serve(args: argparse.Namespace) -> int:
    from trtserve.service import processes
    from trtserve.service.memory import tune_collector, tune_malloc
    from trtserve.service.server import Server, loop_factory

    frontends = args.frontends if args.frontends is not None else "auto"
    logging.basicConfig(level=args.log_level, format=processes.log_format(
        "engine" if frontends != 1 else ""))
    config = build_config(args)
    if (frontends != 1) != (config.resolved_frontends > 1):
        # "auto" came to one process on this host (or a config file asked for more):
        # name this process's lines for what it is from here on.
        logging.basicConfig(level=args.log_level, force=True, format=processes.log_format(
            "engine" if config.resolved_frontends > 1 else ""))
    # The process's allocator, before the server allocates anything large.
    tune_malloc(config.malloc_mmap_threshold_bytes)
    tune_collector(config.gc_gen0_threshold)
    _say_open_files(open_files.raise_to_hard(), config)
    _say_cpu_quota(config)
    if config.resolved_frontends > 1:
        return processes.serve(config, args.log_level)
    with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
        runner.run(Server(config).serve_until_signal())
    return 0


def _say_open_files(files: open_files.OpenFiles, config: ServerConfig) -> None:
    """Log the open-file limit the server runs with, and the gRPC connections it leaves
    room for: each client connection holds one file."""
    if files.error:
        log.warning("cannot raise the open-file limit from %d: %s", files.before, files.error)
    elif files.limit != files.before:
        log.info("open-file limit raised from %d to %d (the hard limit)", files.before,
                 files.limit)
    if files.limit < open_files.LOW:
        log.warning("at most %d open files: about that many client "
                    "connections leave the server unable to accept more or open files; "
                    "raise it (ulimit -Hn, systemd's LimitNOFILE=, docker run --ulimit "
                    "nofile=N:N)", files.limit)
    wanted = config.grpc_max_connections
    cap = config.resolved_grpc_max_connections
    if cap < wanted or not wanted:
        # Lowered (a warning: the operator asked for more), or no cap asked for.
        log.log(logging.WARNING if wanted else logging.INFO,
                "at most %d gRPC connections per process%s: what the open-file limit (%d) "
                "leaves after the server's own files%s", cap,
                f", not server.grpc_max_connections' {wanted}" if wanted else "",
                files.limit, " and HTTP's connections" if config.http_port else "")


def _say_cpu_quota(config: ServerConfig) -> None:
    """Say what a CPU quota (a container's limit) makes of the cores counted: the quota
    throttles the whole server, however many cores its affinity lists."""
    limit = cpus.cpu_quota()
    if limit is None:
        return
    usable = cpus.usable()
    log.info("a CPU quota of %.2g cores: counting %d usable core%s (frontends = auto, "
             "ONNX Runtime's threads); frontends poll for a lone reply for %d us, the "
             "engine for the next request for %d us", limit, usable, "s" if usable > 1 else "",
             config.resolved_frontend_spin_us, config.resolved_engine_spin_us)
    if config.resolved_frontends > usable:
        log.warning("%d frontends on a CPU quota of %.2g cores: they will be throttled; "
                    "fewer frontends (or 'auto') serve more", config.resolved_frontends, limit)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 stopped by a signal (or a command done), 2 a start error (the
    configuration, a model, a file or a port: one line says what to fix; argparse's
    usage errors are 2 as well), 1 an unexpected error (one line; --log-level DEBUG
    prints its traceback)."""
    parser = argparse.ArgumentParser(prog="trtserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve(sub)
    _register_optional(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except StartError as e:
        log.debug("start error", exc_info=True)
        kind = "configuration error" if isinstance(e, ConfigError) else "cannot start"
        print(f"trtserve: {kind}: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        log.debug("unexpected error", exc_info=True)
        print(f"trtserve: unexpected error: {type(e).__name__}: {first_line(e)} (run with "
              "--log-level DEBUG for the traceback)", file=sys.stderr)
        return 1


def _register_optional(sub: argparse._SubParsersAction) -> None:
    from trtserve.service.build import cli as build_cli

    build_cli.register(sub)
    import importlib

    try:
        sweep_cli = importlib.import_module("trtserve.service.sweep.cli")
    except ModuleNotFoundError as e:
        if e.name not in ("trtserve.service.sweep", "trtserve.service.sweep.cli"):
            raise
    else:
        sweep_cli.register(sub)


if __name__ == "__main__":
    sys.exit(main())
