"""KServe's model repository extension (RepositoryIndex, RepositoryModelLoad and
RepositoryModelUnload) in terms of the engine's model control (engine/api.py).

Triton's semantics: a load of a model already loaded reloads it (a new version,
switched to atomically); an unload stops serving the model. trtserve has one
repository, named "" (or any name: clients such as tritonclient send ""). Load
parameters: `path` (string_param), the model file to load instead of the
configured one (a new model needs one). Unload parameters: `unload_dependents`
(bool_param; trtserve has no ensembles, so it changes nothing). Any other
parameter is INVALID_ARGUMENT naming it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from trtserve.client.gen.inference import grpc_service_pb2 as pb
from trtserve.service import echo
from trtserve.service.engine.api import READY, ModelState
from trtserve.service.errors import InvalidArgument

PATH_PARAMETER = "path"
LOAD_PARAMETERS = (PATH_PARAMETER,)
UNLOAD_PARAMETERS = ("unload_dependents",)


def _check_names(rpc: str, parameters: Iterable[str], known: tuple[str, ...]) -> None:
    for name in parameters:
        if name not in known:
            raise InvalidArgument(f"{rpc}: unknown parameter '{echo.text(name)}'; trtserve "
                                  f"takes {list(known)}")


def check_name(rpc: str, model: str) -> None:
    if not model:
        raise InvalidArgument(f"{rpc} needs a model_name")


def load_path(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> str:
    """The `path` parameter of a RepositoryModelLoad ("" when absent)."""
    _check_names("RepositoryModelLoad", parameters, LOAD_PARAMETERS)
    if PATH_PARAMETER not in parameters:
        return ""
    param = parameters[PATH_PARAMETER]
    if param.WhichOneof("parameter_choice") != "string_param" or not param.string_param:
        raise InvalidArgument("RepositoryModelLoad: parameter 'path' must be a non-empty "
                              "string_param (the model file on the server's host)")
    return param.string_param


def check_unload(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> None:
    _check_names("RepositoryModelUnload", parameters, UNLOAD_PARAMETERS)


def index(states: Iterable[ModelState], ready_only: bool) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(models=[
        pb.RepositoryIndexResponse.ModelIndex(name=s.name, version=s.version, state=s.state,
                                              reason=s.reason)
        for s in states if not ready_only or s.state == READY])
