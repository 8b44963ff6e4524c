"""What the end-to-end tests share: a free port, plain HTTP requests, and a `capy serve`
started with both real models and a database of its own (keys in CAPY_HOME's would lock the
tests out), stopped and cleaned up after."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAPY = os.environ.get("CAPY_BIN", os.path.join(ROOT, "target", "release", "capy"))
MODELS = ["smollm2-135m", "gemma3-270m"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, method, path, body=None, timeout=60):
    """(status, parsed JSON or text) of a plain request."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read().decode(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read().decode(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def wait_ready(url, proc, seconds=120):
    """Waits until `capy serve` at `url` answers /health with 200; fails if it exits."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if http(url, "GET", "/health")[0] == 200:
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"capy serve exited with {proc.returncode}")
        time.sleep(0.2)
    raise RuntimeError("capy serve did not become ready")


class Server:
    """`capy serve` on a free port with `models` warm (none given: the config file's, with
    `--config` in `extra`); `tag` names its SQLite file."""

    def __init__(self, tag, extra=(), models=MODELS):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.db = f"/tmp/capy-e2e-{tag}-{os.getpid()}.db"
        args = [CAPY, "serve", "--port", str(port), "-t", "2", "--parallel", "16",
                "--database-url", "sqlite://" + self.db, *extra]
        for m in models:
            args += ["-m", m]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=sys.stderr)
        wait_ready(self.url, self.proc)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        for suffix in ("", "-wal", "-shm"):
            try:
                os.remove(self.db + suffix)
            except OSError:
                pass


class Clients:
    """The official `openai` and `ollama` clients of the server at `url` (set once it
    runs), made on first use and closed together."""

    def __init__(self):
        self.url = None
        self.made = {}

    def openai(self):
        if "openai" not in self.made:
            import openai
            self.made["openai"] = openai.OpenAI(base_url=self.url + "/v1", api_key="none",
                                                max_retries=0, timeout=600)
        return self.made["openai"]

    def ollama(self):
        if "ollama" not in self.made:
            import ollama
            self.made["ollama"] = ollama.Client(host=self.url)
        return self.made["ollama"]

    def close(self):
        for c in self.made.values():
            c.close() if hasattr(c, "close") else c._client.close()
        self.made.clear()


def run_tests():
    """Runs the calling module's unittest tests and exits with their status, after a
    cargo-style `test result:` line (scripts/test.sh adds those up)."""
    import unittest
    result = unittest.main(module="__main__", exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    passed = result.testsRun - failed - len(result.skipped)
    print(f"test result: {'ok' if failed == 0 else 'FAILED'}. {passed} passed; {failed} failed")
    sys.exit(1 if failed else 0)
