"""Helpers shared by the Python suites (tests/browser, tests/deploy): paths, free loopback
ports, and `xgen serve` started from the release binary on the tiny fixture model."""
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XGEN = os.path.join(ROOT, "target", "release", "xgen")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "models", "tiny-xgen-8k-bin")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, proc, seconds=60):
    """Waits until `url`/health answers 200, failing if `proc` exits first."""
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url + "/health")
            return
        except (urllib.error.URLError, ConnectionError):
            assert time.time() < deadline and proc.poll() is None, f"{url} never became healthy"
            time.sleep(0.1)


def start_xgen(*args):
    """`xgen serve` on the fixture model and a free port, healthy: (process, base URL)."""
    port = free_port()
    proc = subprocess.Popen([XGEN, "serve", "--model", FIXTURE, "--dtype", "f32", "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, proc)
    return proc, base
