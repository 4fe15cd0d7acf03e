"""Start scripts/serve.py in a subprocess on 127.0.0.1 and stop it: for the load test and the tests.

The server gets a free loopback port, its output goes to a log file (read back when it fails to
start), and `stop` terminates it (then kills it) so no server outlives its caller.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"  # load tests and tests never reach beyond this machine
# No proxy: a machine-wide HTTP(S)_PROXY (set for the package registries) would otherwise receive
# the calls to our own loopback server.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, source: Sequence[str], overrides: Sequence[str], log: Path, env: Optional[Mapping[str, str]] = None, timeout_s: float = 180.0) -> None:
        """`source`: ["--run", DIR] or ["--model", DIR]; `overrides`: serve.py --set values."""
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log = Path(log)
        cmd = [sys.executable, str(REPO / "scripts" / "serve.py"), *source, "--host", LOOPBACK, "--port", str(self.port)]
        for item in overrides:
            cmd += ["--set", item]
        self._log_file = open(self.log, "w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log_file, stderr=subprocess.STDOUT, env=None if env is None else dict(env))
        self._wait(timeout_s)

    def _wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise PipelineError(f"the server exited with code {self.proc.returncode} before serving: {self.log_tail()}")
            try:
                with _OPENER.open(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        self.stop()
        raise PipelineError(f"the server did not answer /health within {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 800) -> str:
        self._log_file.flush()
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.is_file() else ""
        return " ".join(text[-n:].split())

    def get(self, path: str) -> Any:
        with _OPENER.open(f"{self.url}{path}", timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log_file.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def post_json(url: str, body: Any, timeout_s: float = 60.0) -> tuple[int, Any]:
    """(HTTP status, parsed JSON body) of a POST; 4xx/5xx are answers here, not exceptions. `body`
    bytes are sent as they are (malformed-request tests)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with _OPENER.open(req, timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"detail": raw.decode(errors="replace")}
