"""Real Redis servers for the tests, on free loopback ports, started and stopped by PID.

They never touch a Redis the tests did not start (one often runs at 127.0.0.1:6379): each server
here has a port, a pid file and a directory of its own, keeps nothing on disk, and is killed by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def free_port(below: int = 65536) -> int:
    """A free loopback port under `below`."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port < below:
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as connection:
            connection.sendall(b"PING\r\n")
            reply = connection.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH"))  # up, with or without a password


def _running(pid: int) -> bool:
    """Whether the process runs; a zombie (dead, waiting for the init process to reap it) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class RedisServer:
    """One `redis-server` process of our own."""

    def __init__(self, port: int | None = None, *, cluster: bool = False, password: str | None = None) -> None:
        # A cluster node also listens on its port + 10000 (the cluster bus).
        self.port = port if port is not None else free_port(below=55536 if cluster else 65536)
        self.cluster = cluster
        self.password = password
        self.directory = Path(tempfile.mkdtemp(prefix=f"redis-{self.port}-"))
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        pidfile = self.directory / "redis.pid"
        pidfile.unlink(missing_ok=True)
        arguments = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "yes",
            "--pidfile", str(pidfile),
            "--dir", str(self.directory),
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.password is not None:
            arguments += ["--requirepass", self.password]
        if self.cluster:
            arguments += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.directory / "nodes.conf")]
        subprocess.run(arguments, check=True, capture_output=True)
        deadline = time.monotonic() + 10
        while not (pidfile.exists() and pidfile.read_text().strip() and _answers(self.port)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.01)
        self.pid = int(pidfile.read_text())
        return self

    def stop(self) -> None:
        """Kill it by its PID and wait until it is gone (its port is free again)."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        while _answers(self.port) and time.monotonic() < deadline:
            time.sleep(0.01)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class RedisCluster:
    """Three cluster-enabled servers joined into one cluster with no replicas."""

    def __init__(self) -> None:
        ports: list[int] = []
        while len(ports) < 3:
            port = free_port(below=55536)
            # Each node also listens on its port + 10000 (the cluster bus): no node's port may be another's bus.
            taken = {other + offset for other in ports for offset in (-10000, 0, 10000)}
            if port not in taken and _bindable(port + 10000):
                ports.append(port)
        self.nodes = [RedisServer(port, cluster=True) for port in ports]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while not all(self._cluster_ok(node.port) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the test Redis cluster did not come up")
            time.sleep(0.05)
        return self

    @staticmethod
    def _cluster_ok(port: int) -> bool:
        done = subprocess.run(
            [REDIS_CLI, "-p", str(port), "cluster", "info"], capture_output=True, text=True, check=False
        )
        return "cluster_state:ok" in done.stdout

    def remove(self) -> None:
        for node in self.nodes:
            node.remove()
