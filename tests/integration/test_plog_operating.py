"""MemPlog as an operator sees it: `memfabric status`, Session.namespaces() and the
Prometheus counters (appends, bytes, flushes), on a fabric with a pmem pool."""

from __future__ import annotations

import json
import subprocess
import sys

import memfabric
from memfabric.launcher import LocalFabric

from ..conftest import short_tmp_dir
from ..helpers import free_ports
from .test_metrics import scrape, value


def test_status_namespaces_and_metrics_show_plogs():
    port = free_ports(1)
    fab = LocalFabric(short_tmp_dir("mf-plogop-"), servers=1, capacity="16MiB", segment_size="1MiB",
                      liveness_timeout_s=2.0, extra_args=["--pool", "logs:pmem:32MiB", "--metrics-port", str(port)]
                      ).start()
    try:
        with memfabric.init(fab.directory) as s:
            ns = s.create_namespace("journal", sec_id="k", pool="logs")
            before = scrape(f"127.0.0.1:{port}")
            wal = ns.create_plog("wal", 1 << 20)
            wal.append_many([b"x" * 100] * 10)
            wal.append(b"y" * 1000)
            done = ns.create_plog("done", 64 << 10)
            done.append(b"z")
            done.seal()
            (row,) = [n for n in s.namespaces() if n.ns == "journal"]
            length = wal.info()["length"] + done.info()["length"]
            assert (row.plogs, row.plogs_sealed, row.plog_records, row.plog_bytes) == (2, 1, 12, length)
            after = scrape(f"127.0.0.1:{port}")
            grew = {name: value(after, name) - value(before, name) for name in
                    ("memfabric_plog_appends_total", "memfabric_plog_appended_bytes_total",
                     "memfabric_plog_flushes_total")}
            assert grew["memfabric_plog_appends_total"] == 12
            assert grew["memfabric_plog_appended_bytes_total"] == 10 * 100 + 1000 + 1
            assert 3 <= grew["memfabric_plog_flushes_total"] <= 12       # pmem: every append flushed
            assert value(after, "memfabric_plogs", pool="logs", ns="journal") == 2
            assert value(after, "memfabric_plog_bytes", pool="logs", ns="journal") == length
            proc = subprocess.run([sys.executable, "-m", "memfabric", "status", "--dir", fab.directory, "--json"],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            (shown,) = [n for n in json.loads(proc.stdout)["namespaces"] if n["ns"] == "journal"]
            assert shown["plogs"] == 2 and shown["plogs_sealed"] == 1 and shown["plog_bytes"] == length
            table = subprocess.run([sys.executable, "-m", "memfabric", "status", "--dir", fab.directory],
                                   capture_output=True, text=True, timeout=60)
            assert table.returncode == 0 and "sealed" in table.stdout, table.stdout
    finally:
        assert fab.stop() == 0, "".join(fab.output[-30:])
