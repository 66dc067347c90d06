import argparse
import dataclasses

import pytest

from trtserve.service.cli import SERVER_FLAGS, add_serve, build_config
from trtserve.service.config import ModelConfig, ServerConfig, SharedMemoryConfig, load_toml
from trtserve.service.errors import ConfigError

GOOD = """
[server]
port = 9001
metrics_port = 0
grace_period_s = 5

[server.tls]
cert_file = "c.pem"
key_file = "k.pem"

[[models]]
name = "a"
path = "a.onnx"
workers = 3
preferred_batch_sizes = [4, 8]

[[models]]
name = "b"
path = "b.engine"

[models.build]
profiles = 2
"""


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_a_full_file_loads(tmp_path):
    config = load_toml(write(tmp_path, GOOD))
    assert config.port == 9001 and config.grace_period_s == 5.0
    assert config.tls.enabled and config.tls.key_file == "k.pem"
    a, b = config.models
    assert a.workers == 3 and a.preferred_batch_sizes == (4, 8)
    assert a.resolved_backend == "onnxruntime" and b.resolved_backend == "tensorrt"
    assert b.build.profiles == 2


@pytest.mark.parametrize(("text", "words"), [
    ("[server]\nportt = 1\n", "portt"),
    ("[[models]]\nname='a'\npath='a.onnx'\nworkers='2'\n", "models[0].workers"),
    ("[[models]]\nname='a'\npath='a.onnx'\nworkers=true\n", "models[0].workers"),
    ("[[models]]\nname='a'\npath='a.onnx'\nworkers=0\n", "workers"),
    # Taken as they stood before (an adversarial run's folder config.toml).
    ("[[models]]\nname='a'\npath='a.onnx'\nworkers=99999999999999999999\n",
     "workers: got 99999999999999999999, expected 1..256"),
    ("[[models]]\nname='a'\npath='a.onnx'\nintra_op_threads=100000\n",
     "intra_op_threads: got 100000"),
    ("[[models]]\nname='a'\npath='a.onnx'\nintra_op_spinning='yes'\n",
     "models[0].intra_op_spinning"),
    ("[[models]]\nname='a'\npath='a.onnx'\nbackend='tensorflow'\n", "backend"),
    ("[[models]]\nname='a'\npath='a.onnx'\n[[models]]\nname='a'\npath='b.onnx'\n", "unique"),
    ("[[models]]\nname='a'\npath='a.onnx'\n[models.build]\nprofile=2\n", "build"),
    ("[server]\nport = 70000\n", "server.port"),
    ("[[server]]\nport = 1\n", "server: expected one [server] table, got [[server]]"),
    ("server = 3\n", "server: expected one [server] table, got 3"),
    # Triton's max_batch_size is an int32: a larger one failed every metadata call.
    ("[[models]]\nname='a'\npath='a.onnx'\nmax_batch_size=9223372036854775807\n",
     "max_batch_size: got 9223372036854775807"),
    ("[extra]\nx=1\n", "extra"),
    ("[server\n", "c.toml"),
])
def test_bad_files_are_refused_naming_the_key(tmp_path, text, words):
    with pytest.raises(ConfigError, match=None) as err:
        load_toml(write(tmp_path, text))
    assert words in str(err.value)


def test_flags_override_the_file(tmp_path):
    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers())
    args = parser.parse_args([
        "serve", "--config", str(write(tmp_path, GOOD)), "--model", "c=c.onnx", "--port", "7000",
        "--workers", "5", "--max-queue-delay-us", "100", "--event-loop", "asyncio"])
    config = build_config(args)
    assert config.port == 7000 and config.event_loop == "asyncio"
    assert not config.health_requires_auth and config.max_concurrent_streams == 1024
    assert [m.name for m in config.models] == ["a", "b", "c"]
    assert all(m.workers == 5 and m.max_queue_delay_us == 100 for m in config.models)
    assert not any(m.intra_op_spinning for m in config.models)
    spinning = build_config(parser.parse_args(["serve", "--model", "m=m.onnx",
                                               "--intra-op-spinning"]))
    assert spinning.models[0].intra_op_spinning


def test_defaults_are_valid():
    assert ServerConfig().host == "127.0.0.1"
    assert ModelConfig(name="m", path="m.onnx").max_queue_size > 0


def test_every_server_key_but_tls_and_models_has_a_flag():
    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers())
    args = parser.parse_args([
        "serve", "--model", "m=m.onnx", "--health-requires-auth",
        "--max-receive-message-bytes", "4096", "--max-send-message-bytes", "8192",
        "--max-concurrent-streams", "64", "--grace-period-s", "5",
        "--max-pending-calls", "0"])
    config = build_config(args)
    assert config.health_requires_auth and config.max_pending_calls == 0
    assert ServerConfig().max_pending_calls == 16384
    with pytest.raises(ConfigError, match=r"server.max_pending_calls: got -1"):
        ServerConfig(max_pending_calls=-1)
    assert (config.max_receive_message_bytes, config.max_send_message_bytes,
            config.max_concurrent_streams, config.grace_period_s) == (4096, 8192, 64, 5.0)
    keys = {f.name for f in dataclasses.fields(ServerConfig)} - {"tls", "models",
                                                                  "stats_window_s",
                                                                  "shared_memory"}
    assert keys <= set(SERVER_FLAGS)


def test_shared_memory_keys_have_flags_and_are_checked(tmp_path):
    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers())
    args = parser.parse_args([
        "serve", "--model", "m=m.onnx", "--shm-max-regions", "3",
        "--shm-max-mapped-bytes", "4096", "--shm-allow-remote-register",
        "--shm-system-regions", "in_place"])
    shm = build_config(args).shared_memory
    assert (shm.max_regions, shm.max_mapped_bytes, shm.allow_remote_register,
            shm.system_regions) == (3, 4096, True, "in_place")
    assert SharedMemoryConfig().system_regions == "copy"  # safe unless chosen
    path = tmp_path / "c.toml"
    path.write_text('[server.shared_memory]\nsystem_regions = "mapped"\n')
    with pytest.raises(ConfigError, match=r"system_regions: got 'mapped', expected \"copy\" "
                       r"or \"in_place\""):
        load_toml(path)
    path.write_text("[server.shared_memory]\nmax_regions = -1\n")
    with pytest.raises(ConfigError, match=r"server.shared_memory.max_regions: got -1"):
        load_toml(path)
    path.write_text("[server.shared_memory]\nmax_region = 1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['max_region'\]"):
        load_toml(path)


@pytest.mark.parametrize(("settings", "words"), [
    ("worker_retry_backoff_s = 0", "models.a.worker_retry_backoff_s: got 0"),
    ("worker_retry_backoff_s = 2.0\nworker_retry_backoff_max_s = 1.5",
     "models.a.worker_retry_backoff_max_s: got 1.5"),
])
def test_worker_backoff_keys_are_checked(tmp_path, settings, words):
    with pytest.raises(ConfigError) as err:
        load_toml(write(tmp_path, f"[[models]]\nname='a'\npath='a.onnx'\n{settings}\n"))
    assert words in str(err.value)
    config = load_toml(write(tmp_path, "[[models]]\nname='a'\npath='a.onnx'\n"
                                       "worker_retry_backoff_s = 0.5\n"
                                       "worker_retry_backoff_max_s = 30\n"))
    assert (config.models[0].worker_retry_backoff_s,
            config.models[0].worker_retry_backoff_max_s) == (0.5, 30.0)


def test_metrics_flags_set_their_keys():
    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers())
    config = build_config(parser.parse_args([
        "serve", "--model", "m=m.onnx", "--host", "0.0.0.0", "--metrics-host", "::1",
        "--metrics-requires-auth", "--metrics-max-connections", "4",
        "--metrics-timeout-s", "2.5", "--metrics-render-interval-s", "0"]))
    assert (config.host, config.metrics_host, config.metrics_requires_auth,
            config.metrics_max_connections, config.metrics_timeout_s,
            config.metrics_render_interval_s) == ("0.0.0.0", "::1", True, 4, 2.5, 0.0)
    defaults = ServerConfig()
    assert (defaults.metrics_host, defaults.metrics_requires_auth, defaults.metrics_tls,
            defaults.metrics_max_connections, defaults.metrics_timeout_s,
            defaults.metrics_render_interval_s) == ("127.0.0.1", False, False, 16, 5.0, 1.0)


@pytest.mark.parametrize(("key", "value"), [
    ("metrics_host", ""), ("metrics_max_connections", 0), ("metrics_timeout_s", 0.0),
    ("metrics_render_interval_s", -1.0), ("metrics_tls", True)])
def test_bad_metrics_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"server.{key}: got {value!r}"):
        ServerConfig(**{key: value})


def test_model_control_flags_set_their_keys(tmp_path):
    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers())
    default = build_config(parser.parse_args(["serve", "--model", "m=m.onnx"]))
    assert (default.model_control, default.model_watch_interval_s) == (True, 0.0)
    config = build_config(parser.parse_args([
        "serve", "--model", "m=m.onnx", "--no-model-control", "--model-watch-interval-s", "2"]))
    assert (config.model_control, config.model_watch_interval_s) == (False, 2.0)
    from_file = load_toml(write(tmp_path, "[server]\nmodel_control = false\n"))
    assert not from_file.model_control
    with pytest.raises(ConfigError, match=r"server.model_watch_interval_s: got -1"):
        ServerConfig(model_watch_interval_s=-1)
