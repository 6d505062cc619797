"""fp4serve started for a benchmark run when no --base-url is given: `fp4serve serve` in a subprocess
on a free loopback port (a separate process, so the client's Python never competes with the engine
for a GIL), stopped afterwards. `--serve-args` are the words `fp4serve serve` takes."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from fp4serve.errors import BenchError


class LocalServer:
    def __init__(self, serve_args: str = "", log_path: Path | None = None, start_timeout: float = 900):
        self.args = shlex.split(serve_args)
        if any(a.split("=")[0] in ("--host", "--port") for a in self.args):
            raise BenchError("--serve-args must not set --host or --port: the benchmark picks a free loopback port")
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.url = ""
        self._process = None

    def __enter__(self) -> LocalServer:
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def api_key(self) -> str | None:
        for i, arg in enumerate(self.args):
            if arg == "--api-key" and i + 1 < len(self.args):
                return self.args[i + 1]
            if arg.startswith("--api-key="):
                return arg.split("=", 1)[1]
        return None

    def _start(self) -> None:
        with socket.socket() as s:  # a free port; the child binds it a moment later
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        command = [
            sys.executable,
            "-m",
            "fp4serve.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *self.args,
        ]
        self._log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._process.poll() is not None:
                raise BenchError(
                    f"fp4serve serve exited with code {self._process.returncode} before it was ready{self._log_tail()}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"fp4serve serve was not ready after {self.start_timeout:.0f} s{self._log_tail()}")
            time.sleep(0.5)

    def _log_tail(self) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        return "; its log ends with:\n" + "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-15:])

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            if self._log is not subprocess.DEVNULL:
                self._log.close()
            self._process = None
