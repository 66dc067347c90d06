"""`trtserve-client stats`'s table of frontend processes."""

from trtserve.client.cli import _stats_table
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb


def test_the_frontends_table_gives_requests_per_frame():
    response = pb.StatsResponse(frontends=[
        pb.FrontendStats(index=0, pid=11, requests=300, in_flight=2, cpu_seconds=1.5,
                         request_frames=100, open_files=75),
        pb.FrontendStats(index=1, pid=12, requests=0, in_flight=0, cpu_seconds=0.25)])
    lines = _stats_table(response).splitlines()
    at = lines.index("frontends: 2 processes")
    assert lines[at + 1].split() == ["frontend", "pid", "requests", "in", "flight", "cpu", "s",
                                     "req/frame", "open", "files"]
    assert lines[at + 2].split() == ["0", "11", "300", "2", "1.50", "3.00", "75"]
    assert lines[at + 3].split() == ["1", "12", "0", "0", "0.25", "0.00", "0"]  # no frames yet
