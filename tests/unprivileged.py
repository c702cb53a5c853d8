"""Running a process as another, unprivileged user (`nobody`), for tests of what the kernel
lets a same-user process do. The tests run as root, which the kernel's checks let through,
so a claim about "another process of the server's user" is only tested for real this way."""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig

import pytest

import memfabric

USER = "nobody"


def ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"no user {USER!r} on this host")
    return entry.pw_uid, entry.pw_gid


def become(uid: int, gid: int, groups: tuple[int, ...] = ()):
    """A preexec_fn: drop to uid/gid (and these supplementary groups) before exec. After exec
    the process is an ordinary process of that user, dumpable like any other."""
    def drop() -> None:
        os.setgroups(list(groups))
        os.setgid(gid)
        os.setuid(uid)
    return drop


@functools.cache
def python() -> tuple[str, dict[str, str]]:
    """An interpreter the user can run, with memfabric and its dependencies importable:
    ours if the user can reach it, else the system's of the same version (ours may live
    under root's home)."""
    uid, gid = ids()
    source = os.path.dirname(os.path.dirname(memfabric.__file__))
    site = sysconfig.get_paths()["purelib"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{source}:{site}", "PYTHONUNBUFFERED": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")):
        if not candidate:
            continue
        try:
            probe = subprocess.run([candidate, "-c", "import memfabric, numpy, msgpack"], env=env, cwd="/",
                                   preexec_fn=become(uid, gid), capture_output=True, timeout=60)
        except OSError:          # the user cannot even execute it
            continue
        if probe.returncode == 0:
            return candidate, env
    pytest.skip(f"no {version} interpreter that user {USER!r} can run with memfabric importable")
