"""gateway.front.access_log's rotating sink in-process: rotation keeps whole lines within the size."""

from __future__ import annotations

import os
from pathlib import Path


def test_rotating_sink_keeps_whole_lines_within_the_size():
    import tempfile

    from gateway.front.access_log import RotatingSink

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.log")
        sink = RotatingSink(path, max_bytes=1000, backups=3)
        lines = [f"line {i:05d} {'y' * 40}\n".encode() for i in range(500)]
        for i in range(0, len(lines), 37):  # writes of several lines, as batches come
            sink.write(b"".join(lines[i:i + 37]))
        sink.close()
        names = sorted(os.listdir(d))
        assert names == ["x.log", "x.log.1", "x.log.2", "x.log.3"], names
        kept = b"".join(Path(d, n).read_bytes() for n in ("x.log.3", "x.log.2", "x.log.1", "x.log"))
        assert kept == b"".join(lines[-len(kept.splitlines()):])
        assert all(os.path.getsize(os.path.join(d, n)) <= 1000 for n in names)
