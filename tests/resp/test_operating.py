"""What operators see of the door: `memfabric status` and the Prometheus metrics show its
connections, its commands by name and its errors; a stopped fabric leaves no door open."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from memfabric.launcher import LocalFabric

from ..conftest import short_tmp_dir
from ..helpers import WAIT_S, free_ports
from ..integration.test_metrics import scrape, value
from .wire import Raw

MF = [sys.executable, "-m", "memfabric"]


def test_status_and_metrics_show_the_door():
    resp_port, metrics_port = free_ports(1), free_ports(2)
    fab = LocalFabric(short_tmp_dir("mf-resp-ops-"), servers=2, capacity="32MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0,
                      extra_args=["--resp-port", str(resp_port), "--metrics-port", str(metrics_port)]).start()
    try:
        held = Raw(resp_port)
        raw = Raw(resp_port)
        assert raw.run(["SET a 1", "SET b 2", "GET a", "GET", "NOSUCH x", "INCR a", "SET a x", "INCR a"])[-1] == \
            b"-ERR value is not an integer or out of range\r\n"
        raw.close()
        bad = Raw(resp_port)
        bad.send(b"*x\r\n")
        assert bad.until_closed() == (b"-ERR Protocol error: invalid multibulk length\r\n", True)
        bad.close()
        assert held.run(["PING"]) == [b"+PONG\r\n"]        # served: counted before we look

        state = json.loads(subprocess.run(MF + ["status", "--dir", fab.directory, "--json"], capture_output=True,
                                          text=True, timeout=WAIT_S * 3, check=True).stdout)
        [door] = state["doors"]
        assert door["server_id"] == 1 and door["address"] == f"127.0.0.1:{resp_port}"
        assert door["ns"] == "default" and door["auth_required"] is False
        assert door["connected"] == 1 and door["connections_total"] == 3
        assert door["commands"] == {"set": 3, "get": 2, "unknown": 1, "incr": 2, "protocol": 1, "ping": 1}
        assert door["errors"] == {"get": 1, "unknown": 1, "incr": 1, "protocol": 1}
        table = subprocess.run(MF + ["status", "--dir", fab.directory], capture_output=True, text=True,
                               timeout=WAIT_S * 3, check=True).stdout
        assert "Redis-protocol doors" in table and "loopback" in table, table

        samples = scrape(f"127.0.0.1:{metrics_port}")
        assert value(samples, "memfabric_clients", door="resp") == 1
        assert value(samples, "memfabric_resp_connections_total") == 3
        assert value(samples, "memfabric_resp_commands_total", command="set") == 3
        assert value(samples, "memfabric_resp_commands_total", command="unknown") == 1
        assert value(samples, "memfabric_resp_errors_total", command="incr") == 1
        assert value(samples, "memfabric_resp_errors_total", command="protocol") == 1
        # The second server has no door: none in its figures.
        assert value(scrape(f"127.0.0.1:{metrics_port + 1}"), "memfabric_resp_connections_total") == 0
        held.close()
    finally:
        assert fab.stop() == 0
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", resp_port)) != 0, "the door is still open after the fabric stopped"


def test_a_taken_door_port_fails_the_start_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        directory = short_tmp_dir("mf-resp-taken-")
        proc = subprocess.run(MF + ["up", "--dir", directory, "--servers", "1", "--capacity", "32MiB",
                                    "--resp-port", str(port)], capture_output=True, text=True, timeout=WAIT_S * 6)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"server.resp_listen 127.0.0.1:{port}: Address already in use" in out
    assert "Traceback" not in out, out
