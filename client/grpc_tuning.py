"""The gRPC C-core settings trtserve runs with, set when this module is imported.

gRPC reads GRPC_EXPERIMENTS once, when `grpc` loads, so this module must be
imported before anything imports grpc: `service/cli.py` imports it first, and
`trtserve-client bench` imports it before it starts its load processes (they
inherit the environment).

What it sets, and why: since grpcio 1.6x the C core moves every socket through
its EventEngine, which adds thread hand-offs to each read and write. The older
iomgr transport polls the sockets on the thread that waits for the call, which
shortens a client's unary round trip (how much, measured by `make bench`:
docs/benchmarks.md, "gRPC transport"). iomgr is the transport gRPC shipped for
years. The server's listener stays on the EventEngine: on iomgr's, one
connection flooding PING or WINDOW_UPDATE frames held every new connection's
handshake until the flood stopped (docs/reliability.md, "Connections"). That
safety costs the server about 8-17% more CPU per call than iomgr's listener
(docs/benchmarks.md, "gRPC transport"); a server only trusted clients reach can
take it back with GRPC_EXPERIMENTS=-event_engine_listener plus EXPERIMENTS's two.

A GRPC_EXPERIMENTS already in the environment wins, so
`GRPC_EXPERIMENTS= trtserve serve ...` runs on gRPC's own defaults.
"""

from __future__ import annotations

import os
import sys

EXPERIMENTS = "-event_engine_client,-event_engine_for_all_other_endpoints"

os.environ.setdefault("GRPC_EXPERIMENTS", EXPERIMENTS)

# False when grpc was loaded first: the setting then reaches child processes only.
APPLIED_HERE = "grpc" not in sys.modules
