"""`listen_processes`: several processes receive on one DICOM port (SO_REUSEPORT), as storescp --fork
uses a process per association; the children receive only and die with their parent."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from .test_node_e2e import free_port, port_open, storescu, wait_for, write_study

pytestmark = pytest.mark.slow


def listening_sockets(port: int) -> int:
    """How many sockets are in LISTEN state on this TCP port (IPv4)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
            count += 1
    return count


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_two_processes_share_the_port_receive_everything_and_children_die_with_the_parent(tmp_path):
    port, storage = free_port(), tmp_path / "var"
    env = {**os.environ, "OSTEOSCREEN_LISTEN_PROCESSES": "2", "OSTEOSCREEN_SETTLE_SECONDS": "3600",
           "OSTEOSCREEN_BIND_ADDRESS": "127.0.0.1"}
    log = tmp_path / "listen.log"
    proc = subprocess.Popen([sys.executable, "-m", "osteoscreen.cli", "listen", "--port", str(port),
                             "--storage", str(storage)], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    engine = create_engine(f"sqlite:///{storage / 'osteoscreen.db'}")
    try:
        assert wait_for(lambda: listening_sockets(port) == 2 or proc.poll() is not None, 60), log.read_text()
        children = children_of(proc.pid)
        assert len(children) == 1

        def alive_listeners():
            with engine.connect() as c:
                return c.execute(text("SELECT count(DISTINCT pid) FROM process_heartbeats "
                                      "WHERE roles = 'listen'")).scalar()
        assert wait_for(lambda: alive_listeners() == 2, 30)

        # 12 studies from 4 concurrent senders, each its own association
        files = [write_study("hip", tmp_path / "in" / str(i), seed=300 + i)[0] for i in range(12)]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda f: storescu(port, f), files))
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        with engine.connect() as c:
            stored = c.execute(text("SELECT count(*) FROM instances")).scalar()
            studies = c.execute(text("SELECT count(*) FROM studies")).scalar()
        assert (stored, studies) == (sum(len(f) for f in files), 12)
        # the child really received: it wrote images (bytes written, from /proc/<pid>/io)
        size = min(f.stat().st_size for fs in files for f in fs)
        written = int(next(line.split()[1] for line in Path(f"/proc/{children[0]}/io").read_text().splitlines()
                           if line.startswith("wchar:")))
        assert written >= size, (written, size)
        assert "Traceback" not in log.read_text()

        # a clean stop (SIGTERM) stops the child too, without errors
        proc.terminate()
        proc.wait(30)
        assert proc.returncode == 0 and wait_for(lambda: not Path(f"/proc/{children[0]}").exists()
                                                 or "Z" in Path(f"/proc/{children[0]}/stat").read_text().split()[2], 20)
        assert "failed" not in log.read_text() and "Traceback" not in log.read_text(), log.read_text()

        # killed without cleaning up, the parent takes its child along (PR_SET_PDEATHSIG)
        proc = subprocess.Popen([sys.executable, "-m", "osteoscreen.cli", "listen", "--port", str(port),
                                 "--storage", str(storage)], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        assert wait_for(lambda: listening_sockets(port) == 2 or proc.poll() is not None, 60), log.read_text()
        children = children_of(proc.pid)
        assert len(children) == 1

        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_for(lambda: not any(Path(f"/proc/{c}").exists() and
                                        "Z" not in Path(f"/proc/{c}/stat").read_text().split()[2]
                                        for c in children), 20)
        assert wait_for(lambda: not port_open(port), 10)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        for c in children_of(proc.pid):
            os.kill(c, signal.SIGKILL)
        engine.dispose()
