"""A Python that imports torch and dpsn once, then forks a child per script it is asked to run.

Why: the crash loops SIGKILL a writer dozens of times, and a fresh interpreter pays ~2 s of CPU
to import torch each time, most of those loops' cost on a 2-core CI machine. A fork of a process
that has only imported them starts in milliseconds. The zygote runs no torch op and touches no
store before it forks (OpenMP's thread pool and zarr's event-loop thread do not survive a
fork), so each child starts as clean as a fresh interpreter, with the modules already loaded.

Each child runs its script as ``__main__`` with ``sys.argv = [script, *args]``, its stdout
going to a file the test reads (``Child.readline`` waits for a whole line), and dies however
the test makes it die; the zygote reaps it when asked (``Child.wait``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

_SERVER = r"""
import json, os, runpy, sys
import torch, dpsn, dpsn.pool, dpsn.tiers  # noqa: F401  (loaded once, shared by every child)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "spawn":
        open(req["out"], "wb").close()  # there before the test reads it
        pid = os.fork()
        if pid == 0:
            try:
                fd = os.open(req["out"], os.O_WRONLY | os.O_APPEND)
                os.dup2(fd, 1)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.argv = [req["script"], *req["args"]]
                runpy.run_path(req["script"], run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    elif req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        print(json.dumps({"status": status}), flush=True)
"""


class Child:
    """A script the zygote forked: its pid and its stdout, read as it is written."""

    def __init__(self, zygote: Zygote, pid: int, out: Path) -> None:
        self._zygote, self.pid, self._out = zygote, pid, out
        self._read = 0

    def readline(self, timeout: float = 120.0) -> str:
        """The next whole line the child printed ('' if it printed none within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self._out.read_bytes()[self._read :]
            end = data.find(b"\n")
            if end >= 0:
                self._read += end + 1
                return data[: end + 1].decode()
            time.sleep(0.005)
        return ""

    def read_until(self, prefix: str, timeout: float = 120.0) -> str:
        """Lines up to and including the first that starts with ``prefix`` ('' at the end if
        none came within ``timeout``): a loop waits for the work it means to interrupt, so a
        slow machine does not turn its kills into kills before any work."""
        out = []
        while True:
            line = self.readline(timeout)
            out.append(line)
            if not line or line.startswith(prefix):
                return "".join(out)

    def kill(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self) -> str:
        """Reap the child; everything it printed after what :meth:`readline` returned."""
        self._zygote._ask({"op": "wait", "pid": self.pid})
        return self._out.read_bytes()[self._read :].decode()


class Zygote:
    """Forks children that start with torch and dpsn imported (see the module docstring)."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self._dir = workdir
        self._n = 0
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def _ask(self, req: dict) -> dict:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote died (exit {self._proc.wait()})")
        return json.loads(line)

    def spawn(self, script: Path, *args: str) -> Child:
        self._n += 1
        out = self._dir / f"child-{self._n}.out"
        reply = self._ask(
            {"op": "spawn", "script": str(script), "args": list(args), "out": str(out)}
        )
        return Child(self, reply["pid"], out)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(timeout=60)

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
