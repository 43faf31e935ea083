"""The torchrun launcher of tests/conftest.py keeps every process's output and result apart: two ranks printing
at once cannot corrupt what a test reads, and a failing rank's own stderr reaches the assertion message."""

from __future__ import annotations

WORKER = """
import json, os, sys
rank = int(os.environ["RANK"])
for i in range(2000):  # each line in two writes, both ranks at once: lines could interleave in a shared pipe
    sys.stdout.write("rank ")
    sys.stdout.flush()
    sys.stdout.write(f"{rank} line {i}\\n")
    sys.stdout.flush()
if rank == int(sys.argv[1]):
    sys.exit(f"rank {rank} gives up")
with open(os.path.join(os.environ["DEEM_TEST_RESULTS"], f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world_size": int(os.environ["WORLD_SIZE"])}, f)
"""


def test_each_rank_has_its_own_output_and_result(torchrun, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = torchrun([str(script), "-1"], timeout=120)
    assert proc.returncode == 0, proc.report()
    assert proc.results == {0: {"rank": 0, "world_size": 2}, 1: {"rank": 1, "world_size": 2}}
    for rank in (0, 1):
        assert proc.rank_stdout[rank].splitlines() == [f"rank {rank} line {i}" for i in range(2000)]


def test_a_failing_rank_is_reported_with_its_own_stderr(torchrun, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = torchrun([str(script), "1"], timeout=120)
    assert proc.returncode != 0
    assert "rank 1 gives up" in proc.rank_stderr[1] and "gives up" not in proc.rank_stderr.get(0, "")
    assert 1 not in proc.results and "--- rank 1 stderr\nrank 1 gives up" in proc.report()
