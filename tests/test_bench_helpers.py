"""The benchmark's own measuring helpers (bench/), which its CPU-per-MB figures rest on."""
import subprocess
import sys

import pytest

from bench.memory import tree_cpu_seconds

BUSY = "t = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("reaped", [True, False])
def test_tree_cpu_counts_children_reaped_or_not(reaped):
    """A child's CPU time counts whether the parent has reaped it (then it is in the parent's cutime,
    as with storescp --fork) or not yet (a zombie keeps its own)."""
    script = ("import os, time\n"
              "pid = os.fork()\n"
              "if pid == 0:\n"
              + "".join("    " + line + "\n" for line in BUSY.splitlines()) +
              "    os._exit(0)\n"
              # reaped, or waited for but left a zombie (WNOWAIT)
              + ("os.waitpid(pid, 0)\n" if reaped else "os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)\n") +
              "print('ready', flush=True)\n"
              "time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        used = tree_cpu_seconds(proc.pid)
        assert 0.35 <= used < 5.0, used
    finally:
        proc.kill()
        proc.wait()
