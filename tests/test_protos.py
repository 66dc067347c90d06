"""protos/: stubs in other languages, and the shipped health and reflection protos.

Every proto of ours names where its code goes in Go, Java and C#, so protoc's
plugins take the files as they are (Go's refuses a file without go_package
unless it is mapped by hand). Where protoc and the plugins are installed
(Debian's protobuf-compiler, protoc-gen-go, protoc-gen-go-grpc,
protobuf-compiler-grpc-java-plugin; .ci/run installs them), Go and Java stubs
are generated into a temporary folder, and compiled where Go and Debian's Go
libraries, or javac and Debian's protobuf and gRPC jars, are there too.

grpc.health.v1 and grpc.reflection.v1 are shipped under protos/grpc for
clients that load protos at run time; they must describe the services the
server runs (grpcio-health-checking's and grpcio-reflection's), and the
Makefile must generate no Python for them (it would shadow those packages'
own modules).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format
from google.protobuf.descriptor import FileDescriptor

from trtserve.service.testing.servers import ROOT

PROTOS = ROOT / "protos"
OURS = ("trtserve/v1/inference.proto", "inference/grpc_service.proto",
        "inference/model_config.proto")
# Between trtserve's own processes only (docs/processes.md): Python, no other language.
INTERNAL = ("trtserve/internal/link.proto",)
SHIPPED = ("grpc/health/v1/health.proto", "grpc/reflection/v1/reflection.proto")
# What each language's code generator is told by the files themselves.
GO_PACKAGES = {
    "trtserve/v1/inference.proto": "trtserve/v1;trtservev1",
    # As Triton's Go client generates them (package grpc_client).
    "inference/grpc_service.proto": "./grpc-client;grpc_client",
    "inference/model_config.proto": "./grpc-client;grpc_client",
}
# Java and Go stubs of our protos: the files protoc must write.
GO_FILES = ("trtserve/v1/inference.pb.go", "trtserve/v1/inference_grpc.pb.go",
            "grpc-client/grpc_service.pb.go", "grpc-client/grpc_service_grpc.pb.go",
            "grpc-client/model_config.pb.go")
JAVA_MESSAGE_FILES = ("trtserve/v1/InferRequest.java", "trtserve/v1/InferenceProto.java",
                      "inference/GrpcService.java", "inference/ModelConfigOuterClass.java",
                      "io/grpc/health/v1/HealthCheckRequest.java",
                      "io/grpc/reflection/v1/ServerReflectionRequest.java")
JAVA_GRPC_FILES = ("trtserve/v1/InferenceServiceGrpc.java",
                   "inference/GRPCInferenceServiceGrpc.java",
                   "io/grpc/health/v1/HealthGrpc.java",
                   "io/grpc/reflection/v1/ServerReflectionGrpc.java")
# Debian's jars that generated Java messages and gRPC stubs compile against.
JAVA_JARS = ("protobuf", "grpc-api", "grpc-stub", "grpc-protobuf", "grpc-protobuf-lite",
             "guava", "geronimo-annotation-1.3-spec", "jsr305")
# Debian's Go libraries (GOPATH layout) that generated Go code compiles against.
GOCODE = Path("/usr/share/gocode")


def _descriptors(*names: str) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """The files as protoc parses them (grpcio-tools' protoc, always installed)."""
    out = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}",
         "--descriptor_set_out=/dev/stdout", *names],
        capture_output=True, check=True, timeout=60).stdout
    files = descriptor_pb2.FileDescriptorSet.FromString(out).file
    return {f.name: f for f in files}


def _need(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install protobuf-compiler "
                    "protoc-gen-go protoc-gen-go-grpc protobuf-compiler-grpc-java-plugin; "
                    ".ci/run does)")


def _protoc(out: Path, *args: str, files: tuple[str, ...] = OURS + SHIPPED) -> None:
    done = subprocess.run(["protoc", f"-I{PROTOS}", *args, *files], cwd=out,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # protoc's warnings (an unused import, a bad option) are defects too.
    assert not done.stderr.strip(), done.stderr


def _missing(root: Path, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if not (root / name).is_file()]


# --- what the files say -----------------------------------------------------------------

def test_every_proto_of_ours_names_its_go_java_and_csharp_packages() -> None:
    files = _descriptors(*OURS)
    for name in OURS:
        options = files[name].options
        assert options.go_package == GO_PACKAGES[name], name
        assert options.java_package, name
        assert options.HasField("java_multiple_files"), name
        assert options.java_outer_classname, name
        assert options.csharp_namespace, name


def test_kserve_protos_generate_java_classes_where_tritons_clients_expect_them() -> None:
    """inference.GrpcService.ModelInferRequest, as Triton's Java client imports it."""
    files = _descriptors("inference/grpc_service.proto", "inference/model_config.proto")
    for name, outer in (("inference/grpc_service.proto", "GrpcService"),
                        ("inference/model_config.proto", "ModelConfigOuterClass")):
        options = files[name].options
        assert (options.java_package, options.java_multiple_files,
                options.java_outer_classname) == ("inference", False, outer)


# --- the shipped health and reflection protos ----------------------------------------------

def _served() -> dict[str, FileDescriptor]:
    """The files the server's health and reflection services are generated from."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    # The server answers grpc.reflection.v1 with v1alpha's messages (service/server.py):
    # the same messages under another package name, which this test holds it to.
    return {"grpc/health/v1/health.proto": health_pb2.DESCRIPTOR,
            "grpc/reflection/v1/reflection.proto": reflection_pb2.DESCRIPTOR}


def _by_name(proto: descriptor_pb2.FileDescriptorProto) -> dict[str, str]:
    """Each service and message of a file as text, its package name taken out
    (fields, numbers, types, methods and their request and response types)."""
    package = proto.package
    items = {f"service {s.name}": s for s in proto.service}
    items.update({f"message {m.name}": m for m in proto.message_type})
    items.update({f"enum {e.name}": e for e in proto.enum_type})
    # protoc's descriptor sets carry json_name, generated modules do not: not wire.
    return {name: re.sub(r"\s*json_name: .*", "", text_format.MessageToString(item))
            .replace(f".{package}.", ".PACKAGE.") for name, item in items.items()}


def test_shipped_health_and_reflection_protos_describe_the_services_the_server_runs() -> None:
    shipped = _descriptors(*SHIPPED)
    for name, served in _served().items():
        theirs = descriptor_pb2.FileDescriptorProto()
        served.CopyToProto(theirs)
        assert shipped[name].package == name.rsplit("/", 1)[0].replace("/", ".")
        ours = _by_name(shipped[name])
        for item, text in _by_name(theirs).items():
            if item.startswith("service "):
                # A newer published file may add RPCs (health's List): every method
                # the server answers must be there, as it is.
                for method in re.findall(r"method \{.*?\n\}", text, re.DOTALL):
                    assert method in ours.get(item, ""), f"{name}: {item}: {method}"
            else:
                assert ours.get(item) == text, f"{name}: {item}"


def test_shipped_protos_keep_their_license_header() -> None:
    for name in SHIPPED:
        head = (PROTOS / name).read_text().splitlines()[:14]
        assert re.match(r"// Copyright \d{4} The gRPC Authors", head[0]), name
        assert any("Apache License, Version 2.0" in line for line in head), name


def _makefile_protos() -> list[str]:
    """The proto files the Makefile generates Python from: its PROTOS find, run here."""
    makefile = (ROOT / "Makefile").read_text()
    [command] = re.findall(r"^PROTOS\s*:=\s*\$\(shell (.*)\)\s*$", makefile, re.MULTILINE)
    found = subprocess.run(["sh", "-c", command], cwd=ROOT, capture_output=True, text=True,
                           check=True, timeout=30).stdout
    return sorted(found.split())


def test_makefile_generates_python_for_our_protos_only() -> None:
    """Generated grpc/health/v1/health_pb2 would clash with grpcio-health-checking's."""
    assert _makefile_protos() == sorted(f"protos/{name}" for name in OURS + INTERNAL)


# --- Go -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def go_stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need("protoc", "protoc-gen-go", "protoc-gen-go-grpc")
    out = tmp_path_factory.mktemp("go")
    _protoc(out, f"--go_out={out}", f"--go-grpc_out={out}")
    return out


def test_go_messages_and_grpc_stubs_generate(go_stubs: Path) -> None:
    assert not _missing(go_stubs, GO_FILES)
    source = (go_stubs / "trtserve/v1/inference_grpc.pb.go").read_text()
    assert re.search(r"^package trtservev1$", source, re.MULTILINE)
    assert "func NewInferenceServiceClient(" in source
    kserve = (go_stubs / "grpc-client/grpc_service_grpc.pb.go").read_text()
    assert re.search(r"^package grpc_client$", kserve, re.MULTILINE)
    assert "func NewGRPCInferenceServiceClient(" in kserve


@pytest.mark.slow
def test_go_stubs_compile(go_stubs: Path, tmp_path: Path) -> None:
    libraries = (GOCODE / "src/google.golang.org/grpc", GOCODE / "src/google.golang.org/protobuf")
    if shutil.which("go") is None or not all(lib.is_dir() for lib in libraries):
        pytest.skip("go or Debian's Go gRPC/protobuf libraries not installed (apt-get install "
                    "golang-go golang-google-grpc-dev golang-google-protobuf-dev)")
    src = tmp_path / "src"
    for package in ("trtserve", "grpc-client"):
        shutil.copytree(go_stubs / package, src / package)
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{tmp_path}:{GOCODE}",
           "GOCACHE": str(tmp_path / "cache"), "GOFLAGS": ""}
    done = subprocess.run(["go", "build", "./trtserve/v1", "./grpc-client"], cwd=src, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr


# --- Java -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def java_stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need("protoc", "grpc_java_plugin")
    out = tmp_path_factory.mktemp("java")
    plugin = shutil.which("grpc_java_plugin")
    _protoc(out, f"--java_out={out}", f"--plugin=protoc-gen-grpc-java={plugin}",
            f"--grpc-java_out={out}")
    return out


def test_java_messages_and_grpc_stubs_generate(java_stubs: Path) -> None:
    assert not _missing(java_stubs, JAVA_MESSAGE_FILES + JAVA_GRPC_FILES)
    kserve = (java_stubs / "inference/GrpcService.java").read_text()
    assert "public static final class ModelInferRequest" in kserve


def _jars() -> Iterator[Path]:
    for name in JAVA_JARS:
        yield Path("/usr/share/java") / f"{name}.jar"


@pytest.mark.slow
def test_java_stubs_compile(java_stubs: Path, tmp_path: Path) -> None:
    missing = [jar.name for jar in _jars() if not jar.is_file()]
    if shutil.which("javac") is None or missing:
        pytest.skip(f"javac or Debian's jars missing ({', '.join(missing) or 'javac'}): "
                    "apt-get install default-jdk-headless libprotobuf-java libgrpc-java")
    sources = sorted(str(path) for path in java_stubs.rglob("*.java"))
    classes = tmp_path / "classes"
    done = subprocess.run(
        ["javac", "-nowarn", "-d", str(classes), "-cp", os.pathsep.join(map(str, _jars())),
         *sources], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (classes / "trtserve/v1/InferenceServiceGrpc.class").is_file()
    assert (classes / "inference/GrpcService$ModelInferRequest.class").is_file()
