"""A real etcd on loopback for the tests: its own data directory and ports, stopped after."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pyetcd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    def __init__(self, host: str = "127.0.0.1", netns: str | None = None) -> None:
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is not installed: ./dev test installs Debian's etcd-server")
        self.host = host
        self.data_dir = tempfile.mkdtemp(prefix="mf-etcd-", dir="/tmp")
        self.client_port, self.peer_port = free_port(), free_port()
        self.endpoint = f"{host}:{self.client_port}"
        self.netns = netns
        self.proc: subprocess.Popen | None = None

    def start(self) -> "EtcdServer":
        client_url = f"http://{self.host}:{self.client_port}"
        peer_url = f"http://{self.host}:{self.peer_port}"
        args = ["etcd", "--name", "mf", "--data-dir", self.data_dir,
                "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"mf={peer_url}", "--log-level", "error"]
        if self.netns:
            args = ["ip", "netns", "exec", self.netns, *args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited: {self.proc.stderr.read().decode()[-2000:]}")
            if self._healthy():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("etcd did not come up within 20 s")

    def _healthy(self) -> bool:
        if self.netns:   # only reachable from inside its host's namespace
            code = (f"import pyetcd; c = pyetcd.client({self.host!r}, {self.client_port}, timeout=1); "
                    "c.status()")
            return subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c", code],
                                  capture_output=True, timeout=20).returncode == 0
        try:
            client = pyetcd.client(self.host, self.client_port, timeout=1)
            client.status()
            client.close()
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
