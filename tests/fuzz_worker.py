"""The fuzz test's subprocess: reads one JSON case spec per line on stdin, writes its verdict
(fuzz_ops.run) as one JSON line on stdout. A crash or a hang ends or stalls this process, which
tests/test_fuzz.py then reports as the failing case. Ops named selftest-* test that reporting."""

import json
import os
import sys
import time

import torch

import fuzz_ops


def main() -> None:
    torch.set_num_threads(1)  # many small cases: thread start-up would dominate
    sys.stdout.write("ready\n")  # imports done: the parent's per-case timeout starts after this
    sys.stdout.flush()
    for line in sys.stdin:
        spec = json.loads(line)
        if spec["op"] == "selftest-crash":
            os.abort()
        if spec["op"] == "selftest-hang":
            time.sleep(3600)
        verdict = {"ok": True, "detail": ""} if spec["op"] == "selftest-ok" else fuzz_ops.run(spec)
        sys.stdout.write(json.dumps(verdict) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
