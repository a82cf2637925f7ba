"""One of this repository's servers (api.py, web_demo.py) started as a user starts it, in its own process
on a free loopback port, for the tests and tools/make_assets.py."""
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence


class ServerError(RuntimeError):
    """The server exited or did not answer; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalServer:
    """`python SCRIPT --port PORT ARGS...` with its output in `log_path`; `url` has no trailing slash."""

    def __init__(self, script: str, args: Sequence[str] = (), log_path: Optional[str] = None,
                 cwd: Optional[str] = None, env: Optional[dict] = None):
        self.name = os.path.basename(script)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path or os.devnull, "w") as log:
            self.process = subprocess.Popen([sys.executable, script, "--port", str(self.port), *args], cwd=cwd,
                                            stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait(self, path: str = "/", timeout: float = 180) -> str:
        """Blocks until the server answers HTTP on `path` (any status); returns that URL."""
        url, deadline = self.url + path, time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                return url
            except urllib.error.HTTPError:  # it answered
                return url
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerError(f"{self.name} did not answer on {url} within {timeout} s:\n{self.log()}")
                time.sleep(0.3)

    def log(self) -> str:
        if self.log_path is None:
            return "(no log kept)"
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-6000:]

    def stop(self, timeout: float = 20) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
