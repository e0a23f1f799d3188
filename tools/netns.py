"""A private virtual network for partition experiments: Linux network namespaces and veth pairs.

    from tools.netns import VirtualNetwork
    with VirtualNetwork(leaves=2) as net:
        server = net.run(net.hub, ["python", "server.py", "--host", net.server_address, ...])
        worker = net.run(net.leaves[0], ["python", "worker.py", "--server", net.server_address, ...])
        net.cut(net.leaves[0])      # the worker's packets vanish: no FIN, no RST
        net.heal(net.leaves[0])

Layout (every name and address exists only inside namespaces made here)::

    namespace <tag>-hub                    namespace <tag>-w1
    +------------------------+             +----------------+
    | br0  10.200.0.1/24     |             | eth0           |
    |  |-- port1 ============ veth pair ==== 10.200.0.11/24 |
    |  |-- port2 ====== ...  |             +----------------+
    +------------------------+             namespace <tag>-w2 ...

The hub plays the switch and the server's machine: a bridge with the
server's address, and one bridge port per leaf.  Each leaf is a machine
with one cable: the other end of its veth pair, and its own address.  The
host's own interfaces, routes and firewall are never touched: every
interface is created inside a namespace (``ip -n NS link add ... peer ...
netns OTHER``), and removing the namespaces removes all of it.

:meth:`VirtualNetwork.cut` sets the leaf's bridge port down: what the leaf
sends is dropped at the switch and nothing reaches it, so each side's TCP
stack just sees silence (it retransmits and, after a while, fails a new
connect with "No route to host").  Nobody sends a FIN or a RST, which is
what makes a partition different from a crash.  :meth:`heal` sets the port
up again; TCP retransmissions then get through by themselves.

Needs root (CAP_NET_ADMIN) and iproute2's ``ip``; :func:`unavailable`
says why not, for a test to skip with.  Processes are started with ``ip
netns exec NS``, which switches namespace and then *executes* the command:
the Popen's pid is the command's own, so signals go straight to it.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess

SUBNET = "10.200.0"           # a /24, private (RFC 1918), used only inside the namespaces
HUB_HOST = 1                  # the server's address is SUBNET.1
LEAF_HOST = 10                # leaf i (from 1) is SUBNET.(10 + i)
_counter = itertools.count(1)


def _find_ip() -> str | None:
    # /usr/sbin is not on every user's PATH, and `ip` lives there on Debian.
    return shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/bin/ip") if os.access(p, os.X_OK)), None)


IP = _find_ip()


class NetnsError(Exception):
    """An ``ip`` command failed; the message has its stderr."""


def ip(*args: str) -> None:
    """Run ``ip ARGS``; raise :class:`NetnsError` with its stderr if it fails."""
    if IP is None:
        raise NetnsError("the ip command (iproute2) is not installed")
    done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None if they can).

    Checks for root and the ``ip`` command, then really makes and removes a
    namespace, since a container may forbid it even to root.
    """
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    if IP is None:
        return "the ip command (iproute2) is not installed"
    name = f"sales-probe-{os.getpid()}"
    try:
        ip("netns", "add", name)
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        ip("netns", "del", name)
    except (NetnsError, OSError, subprocess.SubprocessError):
        pass
    return None


def remove_stale() -> list[str]:
    """Remove namespaces this module made in processes that no longer run
    (say a test run that was SIGKILLed before its teardown); return their names.

    Only names of the form ``sales-<pid>-<n>-...`` whose pid is gone are
    touched: anything else, and the namespaces of live processes, stay.
    """
    if IP is None:
        return []
    listed = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, timeout=30)
    removed = []
    for line in listed.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(r"sales-(\d+)-\d+-(hub|w\d+)", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            try:
                ip("netns", "del", name)
                removed.append(name)
            except NetnsError:
                pass
    return removed


class Leaf:
    """One leaf machine: namespace ``ns``, address ``address``, bridge port ``port`` in the hub."""

    def __init__(self, ns: str, address: str, port: str):
        self.ns, self.address, self.port = ns, address, port
        self.cut = False

    def __repr__(self) -> str:
        return f"Leaf({self.ns}, {self.address}{', cut' if self.cut else ''})"


class VirtualNetwork:
    """A hub namespace with a bridge and ``leaves`` leaf namespaces (see the module docstring).

    ``hub`` is the hub's namespace name and ``server_address`` its address;
    ``leaves`` the :class:`Leaf` list.  Use it as a context manager, or
    call :meth:`close`: it always removes every namespace it made, also
    when building the network failed half-way.  Raises :class:`NetnsError`.
    """

    def __init__(self, leaves: int = 1, tag: str | None = None):
        self.tag = tag or f"sales-{os.getpid()}-{next(_counter)}"
        self.hub = f"{self.tag}-hub"
        self.server_address = f"{SUBNET}.{HUB_HOST}"
        self.leaves: list[Leaf] = []
        self._made: list[str] = []
        try:
            self._add_namespace(self.hub)
            ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            ip("-n", self.hub, "addr", "add", f"{self.server_address}/24", "dev", "br0")
            ip("-n", self.hub, "link", "set", "br0", "up")
            ip("-n", self.hub, "link", "set", "lo", "up")
            for _ in range(leaves):
                self.add_leaf()
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._made.append(name)

    def add_leaf(self) -> Leaf:
        """Make one more leaf namespace, cabled to the hub's bridge; return it."""
        n = len(self.leaves) + 1
        leaf = Leaf(f"{self.tag}-w{n}", f"{SUBNET}.{LEAF_HOST + n}", f"port{n}")
        self._add_namespace(leaf.ns)
        # Created inside the hub, its peer inside the leaf: never in the host's namespace.
        ip("-n", self.hub, "link", "add", leaf.port, "type", "veth",
           "peer", "name", "eth0", "netns", leaf.ns)
        ip("-n", self.hub, "link", "set", leaf.port, "master", "br0")
        ip("-n", self.hub, "link", "set", leaf.port, "up")
        ip("-n", leaf.ns, "addr", "add", f"{leaf.address}/24", "dev", "eth0")
        ip("-n", leaf.ns, "link", "set", "eth0", "up")
        ip("-n", leaf.ns, "link", "set", "lo", "up")
        self.leaves.append(leaf)
        return leaf

    def command(self, where, argv: list) -> list:
        """``argv`` prefixed so that it runs in namespace ``where`` (a name or a Leaf)."""
        ns = where.ns if isinstance(where, Leaf) else where
        return [IP, "netns", "exec", ns, *map(str, argv)]

    def run(self, where, argv: list, **popen) -> subprocess.Popen:
        """Start ``argv`` in namespace ``where``; returns the Popen (its pid is argv's)."""
        return subprocess.Popen(self.command(where, argv), **popen)

    def cut(self, leaf: Leaf) -> None:
        """Partition ``leaf``: its bridge port goes down, its packets vanish silently."""
        ip("-n", self.hub, "link", "set", leaf.port, "down")
        leaf.cut = True

    def heal(self, leaf: Leaf) -> None:
        """End the partition of ``leaf``."""
        ip("-n", self.hub, "link", "set", leaf.port, "up")
        leaf.cut = False

    def close(self) -> None:
        """Remove every namespace made here (idempotent; errors are ignored:
        a namespace may be gone already).  Deleting the hub deletes the
        veth pairs, and with them every address of this network."""
        while self._made:
            name = self._made.pop()
            try:
                ip("netns", "del", name)
            except (NetnsError, OSError, subprocess.SubprocessError):
                pass

    def __enter__(self) -> "VirtualNetwork":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
