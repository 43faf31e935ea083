import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import deem


def pytest_collection_modifyitems(config, items):
    """CUDA tests need a GPU and the CUDA kernels; without a GPU they are skipped, but a GPU
    machine whose build lacks the kernels fails them (a broken build must not pass silently)."""
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "cuda" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def cuda_device():
    assert deem.cuda_kernels_built(), "a CUDA GPU is present but deem was built without its CUDA kernels"
    return torch.device("cuda")


RESULTS_ENV = "DEEM_TEST_RESULTS"  # the directory where each rank writes `rank<RANK>.json`


@dataclass
class TorchrunResult:
    """What a torchrun launch left behind, kept apart per process: the launcher's own output, each rank's stdout
    and stderr (from its own log file) and each rank's result (from its own JSON file). Nothing is parsed out
    of a stream two processes write to, so interleaved lines cannot make a test fail."""

    returncode: int
    stdout: str  # the launcher's (torch.distributed.run) own output
    stderr: str
    rank_stdout: dict[int, str]
    rank_stderr: dict[int, str]
    results: dict[int, Any]  # rank -> the JSON a rank wrote to $DEEM_TEST_RESULTS/rank<RANK>.json

    def report(self, tail: int = 4000) -> str:
        """Every process's output, one labelled block each (for assertion messages)."""
        blocks = [f"launcher exit {self.returncode}\n--- launcher stderr\n{self.stderr[-tail:]}"]
        for rank in sorted(set(self.rank_stdout) | set(self.rank_stderr)):
            blocks.append(f"--- rank {rank} stdout\n{self.rank_stdout.get(rank, '')[-tail:]}\n"
                          f"--- rank {rank} stderr\n{self.rank_stderr.get(rank, '')[-tail:]}")
        return "\n".join(blocks)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _per_rank(log_dir: Path, name: str) -> dict[int, str]:
    """torchrun --redirects writes <log_dir>/<run id>/attempt_<n>/<local rank>/{stdout,stderr}.log."""
    found = {}
    for path in sorted(log_dir.glob(f"*/attempt_*/*/{name}.log")):  # a later attempt overrides an earlier one
        found[int(path.parent.name)] = path.read_text(errors="replace")
    return found


def _run_torchrun(args: list[str], timeout: float = 600, nproc: int = 2, env: dict[str, str] | None = None,
                  **kwargs) -> TorchrunResult:
    """`python -m torch.distributed.run --nproc_per_node 2 ARGS` on a free local port; each rank's output goes to
    its own file. The port is found free just before the launch; should another process take it in between, the
    launch is repeated on a new port (no worker has started then)."""
    with tempfile.TemporaryDirectory(prefix="torchrun-") as tmp:
        for _ in range(3):
            log_dir, results = Path(tempfile.mkdtemp(dir=tmp)), Path(tempfile.mkdtemp(dir=tmp))
            proc = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                 "127.0.0.1", "--master_port", str(_free_port()), "--log-dir", str(log_dir), "--redirects", "3",
                 *args],
                capture_output=True, text=True, timeout=timeout,
                env={**(os.environ if env is None else env), RESULTS_ENV: str(results)}, **kwargs)
            rank_stdout, rank_stderr = _per_rank(log_dir, "stdout"), _per_rank(log_dir, "stderr")
            if proc.returncode == 0 or rank_stdout or "EADDRINUSE" not in proc.stderr + proc.stdout:
                break
        return TorchrunResult(proc.returncode, proc.stdout, proc.stderr, rank_stdout, rank_stderr,
                              {int(p.stem[4:]): _result(p) for p in results.glob("rank*.json")})


def _result(path: Path) -> Any:
    """A rank's JSON result; a file it left half-written (it crashed) becomes a string the test will not match."""
    text = path.read_text(errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return f"<{path.name} is not JSON: {text[:200]!r}>"


@pytest.fixture
def torchrun():
    """Launch local processes under torchrun: `torchrun(args, timeout=..., nproc=2, env=..., cwd=...)` returns a
    `TorchrunResult`. A rank reports to the test by writing its own JSON file, never by printing:

        with open(os.path.join(os.environ["DEEM_TEST_RESULTS"], f"rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(result, f)
    """
    return _run_torchrun


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine OpenMP hand-offs make them many
    times slower. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
