"""Kernel shaping: `kvcast serve` and an `HttpLink` client in two network namespaces joined by a veth pair whose
server end has a ``tbf`` qdisc (40 Mbit/s); the measured goodput of a few-MB object sits just under the rate.

Needs root and ``ip netns`` (skips otherwise, e.g. in a container without CAP_SYS_ADMIN / CAP_NET_ADMIN). Every
namespace and process the test creates is removed in ``finally``; traffic stays inside the two namespaces
(the root-namespace reachability probe is bound to ``lo``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.factories import SERVE_TOKEN as TOKEN
from tests.factories import put_synthetic_context as put_context
from tests.factories import start_serve_process

RATE_BPS = 40e6
OBJECT_BYTES = 6_000_000  # ~1.3 s at 40 Mbit/s
PORT = 8470

CLIENT = """
import asyncio, json, sys
from kvcast.netsim.http_link import ExpectedObject, HttpLink

args = json.loads(sys.argv[1])

async def main():
    link = HttpLink(args["url"], args["context"], {(0, "raw"): ExpectedObject(args["nbytes"], args["sha256"])},
                    token=args["token"], retries=0, stall_timeout_s=5.0, connect_timeout_s=5.0)
    try:
        timing = await link.fetch(0, "raw")
    finally:
        await link.aclose()
    seconds = timing.end_s - timing.start_s
    print(json.dumps({"bytes": timing.nbytes, "seconds": seconds, "goodput_bps": timing.nbytes * 8 / seconds}))

asyncio.run(main())
"""


def run(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=check)


class Netns:
    """Two namespaces (server, client) joined by a veth pair in a private /30, torn down by `close`."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:3]}"
        self.server_ns, self.client_ns = f"kvcast-s{tag}", f"kvcast-c{tag}"
        self.server_if, self.client_if = f"kvs{tag}", f"kvc{tag}"  # <= 15 characters
        subnet = 4 * (os.getpid() % 64)
        third = (os.getpid() // 64) % 250
        self.server_ip, self.client_ip = f"10.213.{third}.{subnet + 1}", f"10.213.{third}.{subnet + 2}"
        self.created: list[str] = []

    def setup(self) -> None:
        for ns in (self.server_ns, self.client_ns):
            run("ip", "netns", "add", ns)
            self.created.append(ns)
        run("ip", "link", "add", self.server_if, "type", "veth", "peer", "name", self.client_if)
        for ns, dev, ip in ((self.server_ns, self.server_if, self.server_ip),
                            (self.client_ns, self.client_if, self.client_ip)):
            run("ip", "link", "set", dev, "netns", ns)
            run("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("tc", "-n", self.server_ns, "qdisc", "add", "dev", self.server_if, "root", "tbf", "rate", "40mbit",
            "burst", "32kbit", "latency", "50ms")

    def close(self) -> None:
        # deleting a namespace deletes the veth end in it (and so the pair)
        for ns in self.created:
            run("ip", "netns", "del", ns, check=False)
        if Path(f"/sys/class/net/{self.server_if}").exists():  # setup failed before the move
            run("ip", "link", "del", self.server_if, check=False)
        self.created.clear()


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("iproute2 (ip, tc) is not installed")
    probe = f"kvcast-probe{os.getpid()}"
    added = run("ip", "netns", "add", probe, check=False)
    if added.returncode != 0:
        pytest.skip(f"`ip netns add` failed (no CAP_SYS_ADMIN here?): {added.stderr.strip()}")
    run("ip", "netns", "del", probe, check=False)
    pair = Netns()
    try:
        try:
            pair.setup()
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot build the veth pair / tbf qdisc: {' '.join(exc.cmd)}: {exc.stderr.strip()}")
        yield pair
    finally:
        pair.close()


def test_tbf_shapes_kvcast_serve_between_namespaces(netns, tmp_path):
    from kvcast.streamer.store.dir import DirStore

    data = os.urandom(OBJECT_BYTES)
    store = tmp_path / "store"
    put_context(DirStore(f"dir://{store}"), "ctx-1", [{"raw": data}])
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    env = {**os.environ, "KVCAST_TOKEN": ""}
    server, lines, _ = start_serve_process(
        ["--store", f"dir://{store}", "--host", netns.server_ip, "--port", str(PORT), "--token-file",
         str(token_file), "--access-log", "off"], prefix=("ip", "netns", "exec", netns.server_ns), env=env,
        start_new_session=True, timeout_s=20)
    try:
        assert re.search(rf"listening on http://{re.escape(netns.server_ip)}:{PORT}\b", "".join(lines))
        args = {"url": f"http://{netns.server_ip}:{PORT}", "context": "ctx-1", "nbytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), "token": TOKEN}
        client = subprocess.run(["ip", "netns", "exec", netns.client_ns, sys.executable, "-c", CLIENT,
                                 json.dumps(args)], env=env, capture_output=True, text=True, timeout=20)
        assert client.returncode == 0, client.stderr[-2000:]
        measured = json.loads(client.stdout)
        print(f"tbf 40mbit: {measured}")
        assert measured["bytes"] == OBJECT_BYTES
        assert 0.6 * RATE_BPS < measured["goodput_bps"] < RATE_BPS, measured

        # not reachable from the root namespace: its loopback has no such port, and no local interface
        # leads to the server's address (the probe is bound to lo, so no packet leaves the machine)
        with socket.socket() as s:
            s.settimeout(1.0)
            with pytest.raises(ConnectionRefusedError):
                s.connect(("127.0.0.1", PORT))
        assert netns.server_ip not in run("ip", "-o", "addr").stdout
        with socket.socket() as s:
            s.settimeout(1.0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
            with pytest.raises(OSError):  # a timeout here (nothing answers on lo), or unreachable
                s.connect((netns.server_ip, PORT))
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # ip netns exec runs the server in its own session
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(5)
        server.reader.join(5)
        server.stderr.close()
