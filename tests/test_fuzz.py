"""Property-based fuzzing of every op (hypothesis; specs and verdicts in fuzz_ops.py): valid
inputs match the reference, invalid ones raise an error naming the op and the argument, the
fake kernels agree, and nothing hangs or crashes: every case runs in a worker subprocess with a
timeout, and a case that kills or stalls it fails with its spec.

Profiles (tests/conftest.py): "ci" (the default; derandomized, a bounded number of cases per op)
and "fuzz" (`make fuzz`: many more, a random seed printed on failure, `SEED=` to replay).
"""

import json
import os
import selectors
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given

import fuzz_ops


class Worker:
    """A python process running fuzz_worker.py, restarted after a crash or a hang."""

    def __init__(self, timeout_s: float = 60):  # far above any case's run time
        self.proc = None
        self.timeout_s = timeout_s
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the worker)

    def _start(self):
        tests = str(Path(__file__).resolve().parent)
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-u", os.path.join(tests, "fuzz_worker.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )  # fmt: skip

    def _line(self, timeout_s: float) -> tuple[bool, str]:
        """(whether the worker answered or closed its output in time, the line it wrote)."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout_s)
        return bool(ready), self.proc.stdout.readline() if ready else ""

    def run(self, spec: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
            # Importing torch is not the case's time: on a loaded machine it alone can take
            # longer than a short timeout.
            started, line = self._line(300)
            assert started and line == "ready\n", f"fuzz worker did not start: {line!r}"
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        ready, line = self._line(self.timeout_s)
        if line:
            return json.loads(line)
        self.proc.kill()
        self.proc.wait()
        self.log.seek(0)
        tail = self.log.read().decode(errors="replace")[-2000:]
        what = f"crash (exit {self.proc.returncode})" if ready else f"hang (> {self.timeout_s} s)"
        self.proc = None
        return {"ok": False, "detail": f"{what}\n{tail}"}

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def _fuzz_test(op):
    @given(spec=fuzz_ops.STRATEGIES[op])
    def test(worker, spec):
        verdict = worker.run(spec)
        assert verdict["ok"], f"{verdict['detail']}\nspec: {json.dumps(spec)}"

    test.__name__ = f"test_fuzz_{op}"
    return test


for _op in sorted(fuzz_ops.STRATEGIES):
    globals()[f"test_fuzz_{_op}"] = _fuzz_test(_op)


@pytest.mark.parametrize("kind", ["crash", "hang"])
def test_worker_reports_crashes_and_hangs(kind):
    """The harness itself: a case that kills the worker, or never answers, fails."""
    w = Worker(timeout_s=2)
    verdict = w.run({"op": f"selftest-{kind}"})
    assert not verdict["ok"] and verdict["detail"].startswith(kind), verdict
    assert w.run({"op": "selftest-ok"})["ok"]  # and the next case gets a fresh worker
    w.close()
