"""Test hosts: network namespaces joined by a bridge, one address each.

    switch namespace: bridge br0
    host i namespace: lo + eth0 (veth to the bridge), address SUBNET.i/24

Everything the bed starts runs inside a host's namespace (`ip netns exec`), dies with the
test process (PDEATHSIG), and `close` deletes the namespaces, which takes the veths along.
Traffic stays inside these namespaces: the bridge has no way out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from memfabric.launcher import die_with_parent


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


class TestBed:
    __test__ = False   # a fixture helper, not a test class
    def __init__(self, hosts: int, subnet: str = "10.213.77") -> None:
        tag = f"{os.getpid() % 100000}"
        self.switch = f"mfsw{tag}"
        self.subnet = subnet
        self.names = {i: f"mfh{tag}-{i}" for i in range(1, hosts + 1)}
        self.procs: list[subprocess.Popen] = []
        try:
            sh("ip", "netns", "add", self.switch)
            sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.switch, "link", "set", "br0", "up")
            for i, ns in self.names.items():
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                host_end, switch_end = f"mfa{tag}{i}"[-15:], f"mfb{tag}{i}"[-15:]
                sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", switch_end)
                sh("ip", "link", "set", host_end, "netns", ns)
                sh("ip", "link", "set", switch_end, "netns", self.switch)
                sh("ip", "-n", ns, "link", "set", host_end, "name", "eth0")
                sh("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
                sh("ip", "-n", self.switch, "link", "set", switch_end, "master", "br0")
                sh("ip", "-n", self.switch, "link", "set", switch_end, "up")
        except BaseException:
            self.close()
            raise

    def address(self, host: int) -> str:
        return f"{self.subnet}.{host}"

    def run(self, host: int, args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[host], *args], preexec_fn=die_with_parent,
                                **kwargs)
        self.procs.append(proc)
        return proc

    def python(self, host: int, code: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.names[host], sys.executable, "-c", code, *args],
                              capture_output=True, text=True, timeout=timeout_s)

    def cut_off(self, host: int) -> None:
        sh("ip", "-n", self.names[host], "link", "set", "eth0", "down")

    def reconnect(self, host: int) -> None:
        sh("ip", "-n", self.names[host], "link", "set", "eth0", "up")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in [*self.names.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
