"""The daemon's logs: routine events at INFO, JSON lines on request, each pull's progress as it goes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from daemon_support import start_daemon
from faultproxy import FaultProxy
from support import MP_ARTIFACT, MP_CONFIG, MP_WEIGHT

from modelcache.daemon.metrics import Metrics
from modelcache.daemon.pulls import PullManager
from modelcache.sources import SourceOptions
from modelcache.store import Store
from modelcache.transfer import Engine, TransferConfig
from modelcache.tree import Filters

MiB = 1 << 20


def test_routine_events_are_info_and_json_lines_on_request(tmp_path: Path) -> None:
    """`serve --log-format json`: every line one JSON object; serving and draining are INFO, not WARNING."""
    daemon = start_daemon(tmp_path / "d", "--log-format", "json")
    assert daemon.stop() == 0
    lines = [line for line in daemon.log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # fails on any line that is not JSON
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    serving = [r for r in records if r["message"].startswith("serving HTTP on")]
    draining = [r for r in records if r["message"].startswith("draining")]
    kept = [r for r in records if "leases of mounted volumes" in r["message"]]
    assert serving and draining and kept, records
    assert {r["level"] for r in serving + draining + kept} == {"INFO"}
    assert serving[0]["logger"] == "modelcache.daemon.server" and serving[0]["time"].endswith("+00:00")


def test_text_is_the_default_and_shows_info(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "d")
    daemon.stop()
    text = daemon.log.read_text()
    assert "INFO modelcache.daemon.server: serving HTTP on" in text and "WARNING" not in text, text


def test_a_running_pull_logs_its_progress(registry, tmp_path: Path, caplog) -> None:
    """A slow pull job logs bytes, speed and ETA every interval while it runs (what `kubectl logs` shows)."""
    data = os.urandom(3 * MiB)
    registry.push_image("daemonlogs/slow", "v1", [(data, MP_WEIGHT, {"org.cncf.model.filepath": "w.bin"})],
                        config=b"{}", config_type=MP_CONFIG, artifact_type=MP_ARTIFACT)

    async def run(host: str) -> None:
        store = Store(tmp_path / "store")
        engine = Engine(store.content, TransferConfig(chunk_size=4 * MiB, concurrency=1))
        pulls = PullManager(store, engine, SourceOptions(), Metrics(), progress_interval=0.5)
        try:
            job = await pulls.start(f"oci://{host}/daemonlogs/slow:v1", Filters())
            assert job.task is not None
            await asyncio.wait_for(job.task, 60)
            assert job.state == "done", job.error
        finally:
            engine.close()
            store.close()

    caplog.set_level(logging.INFO, logger="modelcache.daemon.pulls")
    with FaultProxy(registry.host, rate=1 * MiB) as proxy:
        asyncio.run(run(proxy.host))
    lines = [r for r in caplog.records if r.name == "modelcache.daemon.pulls" and "ETA" in r.getMessage()]
    assert len(lines) >= 3, [r.getMessage() for r in caplog.records]
    assert all(r.levelno == logging.INFO and "daemonlogs/slow" in r.getMessage() for r in lines)
    moving = [r.bytes_done for r in lines if 0 < r.bytes_done < 3 * MiB]  # type: ignore[attr-defined]
    assert len(set(moving)) >= 2, [r.getMessage() for r in lines]  # it moves between lines, inside one buffer
