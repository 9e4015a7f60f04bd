"""Start ``tools/serve.py`` in a subprocess on a free loopback port and wait until it listens (for the benchmark,
the rollback drill and the integration tests): ``with ServerProcess(config, args) as server: server.url``."""
import os
import selectors
import subprocess
import sys
import time

from compress.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVE = os.path.join(ROOT, "tools", "serve.py")
LISTENING = "listening on "


class ServerProcess:
    """``python tools/serve.py -c CONFIG --host 127.0.0.1 --port 0 ARGS...`` as a context manager.

    Args:
        config: the serving config file.
        args: more command-line arguments (``-o ...``, ``--run ...``).
        env: extra environment variables (e.g. the admin key).
        start_timeout_s: how long loading the models may take.
        log_path: where the server's stderr goes (default: discarded).
    """

    def __init__(self, config, args=(), env=None, start_timeout_s=180.0, log_path=None):
        self.cmd = [sys.executable, SERVE, "-c", config, "--host", "127.0.0.1", "--port", "0", *args]
        self.env = dict(os.environ, **(env or {}))
        self.start_timeout_s = start_timeout_s
        self.log_path = log_path
        self.proc = None
        self.url = None
        self.banner = None

    def __enter__(self):
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=self.env)
        if self.log_path:
            log.close()
        try:
            self.banner = self._wait_for_banner()
        except BaseException:
            self.stop()
            raise
        self.url = self.banner[len(LISTENING):].split()[0]
        return self

    def _wait_for_banner(self):
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                line = self.proc.stdout.readline()
                if line.startswith(LISTENING):
                    return line.strip()
                if not line and self.proc.poll() is not None:
                    break
            elif self.proc.poll() is not None:
                break
        where = f"; its log: {self.log_path}" if self.log_path else ""
        raise InputError(f"the server did not start within {self.start_timeout_s:g} s (exit code "
                         f"{self.proc.poll()}){where}")

    def stop(self, timeout_s=20.0):
        """SIGTERM (uvicorn shuts down gracefully), SIGKILL after ``timeout_s``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.proc.stdout.closed:
            self.proc.stdout.close()
        return self.proc.returncode

    def __exit__(self, *exc):
        self.stop()
