#!/usr/bin/env python3
"""The NAT lab: turnpike on a public segment, two private sites behind NAT routers, two ICE
agents (aioice) that connect with host, server-reflexive and relayed candidates, for every
combination of NAT behaviours at site A and site B. Needs root (network namespaces).

Topology, built afresh for every combination in namespaces of its own (names tpnl<pid>-<n>-*),
none of them connected to the host's interfaces:

    ha (10.0.1.2) -- ra [NAT A] 198.51.100.11 --+
                                                 br0 in "pub": turnpike 198.51.100.1:3478 (STUN+TURN)
    hb (10.0.2.2) -- rb [NAT B] 198.51.100.12 --+   RFC 5780 alternate 198.51.100.2:3479
                                                    natcheck reflector 198.51.100.4-.6:3479-3481

The public segment uses 198.51.100.0/24 (TEST-NET-2, RFC 5737): never routed anywhere, so
nothing can leak even in principle. turnpike's peer policy refuses documentation ranges by
default, so the lab passes --allowed-peer-ip 198.51.100.0/24: the routers' public addresses
(where server-reflexive candidates live) and turnpike's own relayed addresses are the only
peers it relays to. The sites' ranges 10.0.1.0/24 and 10.0.2.0/24 (RFC 1918) stay refused, as
in production: a relayed check towards a host candidate gets 403.

NAT behaviours (RFC 4787 terms; the classic names of RFC 3489):
  full-cone             EIM + endpoint-independent filtering. netfilter: MASQUERADE (Linux keeps
                        the source port when it can: endpoint-independent mapping) plus a DMZ
                        rule, DNAT of every inbound UDP packet to the inside host, same port.
                        The only router with hairpinning (DNAT + MASQUERADE on the LAN side).
  restricted-cone       EIM + address-dependent filtering. Our own program, userspace_nat.py
                        (conntrack cannot admit "any port of an IP I sent to").
  port-restricted-cone  EIM + address-and-port-dependent filtering. netfilter: MASQUERADE.
  symmetric             address-and-port-dependent mapping and filtering. netfilter:
                        MASQUERADE --random-fully (a random port per new conntrack).
Every router also drops UDP to itself on the WAN side instead of answering ICMP port unreachable.
The kernel NATs start with an empty conntrack table (fresh namespace) and are flushed anyway.

Prediction (NAT-TRAVERSAL.md): number the types 1..4 in the order above; direct UDP hole
punching works when the sum is at most 6. Otherwise ICE must select a pair with a relayed
candidate on turnpike.

Output: one "NATLAB key=value ..." line per combination, then the matrix. Exit status 0 when
every combination exchanged all its data and matched the prediction.

Probe mode (--probe-router NAT, repeatable): instead of the ICE matrix, builds the public
segment and one site behind a router of that kind, checks the router with natcheck.py, and runs
`turnpike probe --server 198.51.100.1:3478` (RFC 5780 NAT behaviour discovery against turnpike's
four listeners) in the site's host. Prints the probe's output and one "NATPROBE key=value ..."
line per router; exit status 0 when each router was classified as configured.

usage: natlab.py --turnpike PATH [--jobs N] [--count N] [--settle S] [--only A:B ...]
       natlab.py --turnpike PATH --probe-router NAT [--probe-router NAT ...]
"""

import argparse
import asyncio
import ctypes
import json
import os
import signal
import sys
import time

import natcheck

HERE = os.path.dirname(os.path.abspath(__file__))
NATS = ["full-cone", "restricted-cone", "port-restricted-cone", "symmetric"]
RANK = {name: i + 1 for i, name in enumerate(NATS)}
PUBLIC_CIDR = "198.51.100.0/24"
TURN_IP = "198.51.100.1"
TURN_PORT = 3478
# turnpike's RFC 5780 alternate address (--alt-listen): with the primary it listens on
# 198.51.100.1 and .2, ports 3478 and 3479 each.
TURN_ALT_IP = "198.51.100.2"
TURN_ALT_PORT = 3479
USER, PASSWORD = "natlab", "natlab-password"
PREFIX = "tpnl"
SITES = {"a": 1, "b": 2}
# What each router must show to natcheck.py (mapping, filtering), checked before ICE runs.
BEHAVIOUR = {
    "full-cone": ("endpoint-independent", "endpoint-independent"),
    "restricted-cone": ("endpoint-independent", "address-dependent"),
    "port-restricted-cone": ("endpoint-independent", "address-and-port-dependent"),
    "symmetric": ("address-and-port-dependent", "address-and-port-dependent"),
}
# Extra public addresses on the segment: turnpike's alternate address, and natcheck.py's
# reflector (.4-.6, ports 3479-3481, clear of turnpike's four listeners).
EXTRA_PUBLIC_IPS = [TURN_ALT_IP, natcheck.R1, natcheck.R2, natcheck.R3]
# What `turnpike probe` must print for each router: mapping, filtering (RFC 5780 / 4787),
# hairpinning (only the full-cone router has it), the RFC 3489 name.
PROBE_EXPECTED = {
    "full-cone": ("endpoint-independent", "endpoint-independent", "yes", "full cone"),
    "restricted-cone": ("endpoint-independent", "address-dependent", "no", "restricted cone"),
    "port-restricted-cone": ("endpoint-independent", "address-and-port-dependent", "no", "port-restricted cone"),
    "symmetric": ("address-and-port-dependent", "address-and-port-dependent", "no", "symmetric"),
}


def predicted(nat_a: str, nat_b: str) -> str:
    return "direct" if RANK[nat_a] + RANK[nat_b] <= 6 else "relay"


def die_with_parent() -> None:
    # Children die with this script, even on SIGKILL (ip netns exec execs, so this sticks).
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class CommandError(RuntimeError):
    pass


async def run(*argv: str, check: bool = True, timeout: float = 20) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise CommandError(f"timed out: {' '.join(argv)}")
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(argv)} -> {proc.returncode}: {err.decode().strip()}")
    return out.decode()


async def nsx(ns: str, *argv: str, check: bool = True) -> str:
    return await run("ip", "netns", "exec", ns, *argv, check=check)


async def spawn(ns: str, *argv: str, stdin=asyncio.subprocess.DEVNULL):
    return await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, *argv,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent,
    )


async def read_until(stream: asyncio.StreamReader, needle: str, timeout: float, seen: list) -> str:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CommandError(f"timed out waiting for {needle!r}; got {seen[-5:]}")
        line = await asyncio.wait_for(stream.readline(), left)
        if not line:
            raise CommandError(f"stream ended before {needle!r}; got {seen[-5:]}")
        text = line.decode().rstrip()
        seen.append(text)
        if needle in text:
            return text


async def drain(stream: asyncio.StreamReader, sink: list) -> None:
    """Keeps a child's pipe empty (a full pipe would stall it), keeping the lines."""
    while True:
        line = await stream.readline()
        if not line:
            return
        sink.append(line.decode(errors="replace").rstrip())


async def stop(proc, grace: float = 3.0) -> None:
    if proc is None or proc.returncode is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), grace)
    except (asyncio.TimeoutError, ProcessLookupError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        await proc.wait()


class Lab:
    """One combination's namespaces and processes; close() removes all of it. `nats` maps
    each site ("a", "b", or only "a" in probe mode) to its router's NAT kind."""

    def __init__(self, index: int, nats: dict, turnpike: str, turnpike_args=()):
        base = f"{PREFIX}{os.getpid()}-{index}"
        self.sites = {site: SITES[site] for site in nats}
        self.ns = {k: f"{base}-{k}" for k in ["pub"] + [f"{r}{s}" for s in nats for r in "rh"]}
        self.nat = dict(nats)
        self.turnpike_bin = turnpike
        self.turnpike_args = list(turnpike_args)
        self.procs = []
        self.turnpike = None
        self.turnpike_log = []
        self.nat_logs = {}
        self.drains = []
        self.created = []

    async def setup(self) -> None:
        for ns in self.ns.values():
            await run("ip", "netns", "add", ns)
            self.created.append(ns)
            await run("ip", "-n", ns, "link", "set", "lo", "up")
        pub = self.ns["pub"]
        await run("ip", "-n", pub, "link", "add", "br0", "type", "bridge")
        await run("ip", "-n", pub, "addr", "add", f"{TURN_IP}/24", "dev", "br0")
        for ip in EXTRA_PUBLIC_IPS:
            await run("ip", "-n", pub, "addr", "add", f"{ip}/24", "dev", "br0")
        await run("ip", "-n", pub, "link", "set", "br0", "up")
        for site, n in self.sites.items():
            r, h = self.ns[f"r{site}"], self.ns[f"h{site}"]
            wan_ip = f"198.51.100.{10 + n}"
            await run("ip", "-n", r, "link", "add", "wan", "type", "veth",
                      "peer", "name", f"site{site}", "netns", pub)
            await run("ip", "-n", pub, "link", "set", f"site{site}", "master", "br0", "up")
            await run("ip", "-n", r, "addr", "add", f"{wan_ip}/24", "dev", "wan")
            await run("ip", "-n", r, "link", "set", "wan", "up")
            await run("ip", "-n", r, "route", "add", "default", "via", TURN_IP)
            await run("ip", "-n", r, "link", "add", "lan", "type", "veth",
                      "peer", "name", "eth0", "netns", h)
            await run("ip", "-n", r, "addr", "add", f"10.0.{n}.1/24", "dev", "lan")
            await run("ip", "-n", r, "link", "set", "lan", "up")
            await run("ip", "-n", h, "addr", "add", f"10.0.{n}.2/24", "dev", "eth0")
            await run("ip", "-n", h, "link", "set", "eth0", "up")
            await run("ip", "-n", h, "route", "add", "default", "via", f"10.0.{n}.1")
            await self.configure_nat(site, n, wan_ip)
        # turnpike on the public segment.
        self.turnpike = await spawn(
            pub, self.turnpike_bin,
            "--listen", f"{TURN_IP}:{TURN_PORT}", "--alt-listen", f"{TURN_ALT_IP}:{TURN_ALT_PORT}",
            "--relay-ip", TURN_IP,
            "--realm", "natlab", "--user", f"{USER}:{PASSWORD}",
            "--allowed-peer-ip", PUBLIC_CIDR, *self.turnpike_args,
        )
        self.procs.append(self.turnpike)
        await read_until(self.turnpike.stderr, "listening on udp", 10, self.turnpike_log)
        self.drains.append(asyncio.create_task(drain(self.turnpike.stderr, self.turnpike_log)))
        # The reflector for natcheck.py.
        reflector = await spawn(pub, sys.executable, os.path.join(HERE, "natcheck.py"), "reflect")
        self.procs.append(reflector)
        await read_until(reflector.stdout, "ready", 10, [])

    async def await_nat_discovery(self, timeout: float = 15) -> None:
        """Waits until turnpike answers NAT discovery on all four listeners: `turnpike probe`
        from the public segment itself (no NAT) must find the alternate address and classify
        "open internet", which takes answers from .1:3478, .2:3478 and, by CHANGE-REQUEST,
        from .2:3479 and .1:3479."""
        deadline = time.monotonic() + timeout
        while True:
            out = await nsx(self.ns["pub"], self.turnpike_bin, "probe", "--server", f"{TURN_IP}:{TURN_PORT}",
                            check=False)
            if f"other address {TURN_ALT_IP}:{TURN_ALT_PORT}" in out and "open internet" in out:
                return
            if time.monotonic() > deadline:
                raise CommandError(f"turnpike's NAT discovery not answering from the public segment: {out}")
            await asyncio.sleep(0.2)

    async def natcheck(self) -> dict:
        """Each router's mapping and filtering behaviour as natcheck.py measures it."""

        async def one(site):
            out = await nsx(self.ns[f"h{site}"], sys.executable,
                            os.path.join(HERE, "natcheck.py"), "probe")
            line = next((l for l in out.splitlines() if l.startswith("NATCHECK ")), "")
            return dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)

        return dict(zip(self.sites, await asyncio.gather(*(one(site) for site in self.sites))))

    async def probe(self, template: str) -> dict:
        """Runs a command (part of the NAT behaviour discovery work) in each site's host."""
        out = {}
        for site in self.sites:
            cmd = template.format(stun=f"{TURN_IP}:{TURN_PORT}", turn_ip=TURN_IP, turn_port=TURN_PORT)
            out[site] = (await nsx(self.ns[f"h{site}"], "sh", "-c", cmd, check=False)).strip()
        return out

    async def configure_nat(self, site: str, n: int, wan_ip: str) -> None:
        r = self.ns[f"r{site}"]
        nat = self.nat[site]
        ipt = ("ip", "netns", "exec", r, "iptables", "-w", "5")
        # A router answers nothing itself: no ICMP port unreachable for unsolicited packets.
        await run(*ipt, "-A", "INPUT", "-i", "wan", "-p", "udp", "-j", "DROP")
        if nat == "restricted-cone":
            await nsx(r, "sysctl", "-qw", "net.ipv4.ip_forward=0")
            for dev in ("lan", "wan"):
                await run(*ipt, "-t", "raw", "-A", "PREROUTING", "-i", dev, "-p", "udp", "-j", "DROP")
            proc = await spawn(
                r, sys.executable, os.path.join(HERE, "userspace_nat.py"),
                "lan", f"10.0.{n}.0/24", "wan", wan_ip, "--filtering", "address",
            )
            self.procs.append(proc)
            await read_until(proc.stdout, "ready", 10, [])
            self.nat_logs[site] = []
            self.drains.append(asyncio.create_task(drain(proc.stderr, self.nat_logs[site])))
            return
        await nsx(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        if nat == "port-restricted-cone":
            await run(*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE")
        elif nat == "symmetric":
            await run(*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "wan",
                      "-j", "MASQUERADE", "--random-fully")
        elif nat == "full-cone":
            await run(*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE")
            await run(*ipt, "-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p", "udp",
                      "-j", "DNAT", "--to-destination", f"10.0.{n}.2")
            # Hairpinning ("NAT loopback", RFC 4787 REQ-9), so that the probe's hairpinning
            # test has a router that passes it: a LAN packet to the public address goes back
            # in to the host, from the router's LAN address.
            await run(*ipt, "-t", "nat", "-A", "PREROUTING", "-i", "lan", "-d", wan_ip, "-p", "udp",
                      "-j", "DNAT", "--to-destination", f"10.0.{n}.2")
            await run(*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "lan", "-s", f"10.0.{n}.0/24",
                      "-d", f"10.0.{n}.2", "-j", "MASQUERADE")
        else:
            raise ValueError(nat)
        await nsx(r, "conntrack", "-F", check=False)

    async def agents(self, count: int, settle: float) -> dict:
        roles = {"a": "controlling", "b": "controlled"}
        procs = {}
        for site, role in roles.items():
            procs[site] = await spawn(
                self.ns[f"h{site}"], sys.executable, os.path.join(HERE, "ice_agent.py"),
                role, TURN_IP, str(TURN_PORT), USER, PASSWORD, str(count), str(settle),
                stdin=asyncio.subprocess.PIPE,
            )
            self.procs.append(procs[site])

        async def first_json(proc) -> dict:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            if not line:
                err = await proc.stderr.read()
                raise CommandError(f"agent exited: {err.decode()[-2000:]}")
            return json.loads(line)

        offers = dict(zip(procs, await asyncio.gather(*(first_json(p) for p in procs.values()))))
        # Signalling on the host, never through the lab network.
        for site, other in (("a", "b"), ("b", "a")):
            procs[site].stdin.write((json.dumps(offers[other]) + "\n").encode())
            await procs[site].stdin.drain()
        results = dict(zip(procs, await asyncio.gather(*(first_json(p) for p in procs.values()))))
        for site, proc in procs.items():
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                pass
        return {site: r.get("result", r) for site, r in results.items()}

    async def stop_turnpike(self) -> str:
        await stop(self.turnpike)
        await asyncio.wait(self.drains, timeout=3)
        return next((l for l in self.turnpike_log if "shut down" in l), "")

    async def close(self) -> None:
        for proc in self.procs:
            await stop(proc)
        if self.drains:
            await asyncio.wait(self.drains, timeout=3)
        for task in self.drains:
            task.cancel()
        for ns in self.created:
            await run("ip", "netns", "del", ns, check=False)


def counter(line: str, name: str) -> int:
    for word in line.split():
        if word.startswith(name + "="):
            try:
                return int(word.split("=", 1)[1])
            except ValueError:
                return -1
    return -1


def cand(c) -> str:
    return f"{c['type']}:{c['addr']}" if c else "none"


async def run_combination(index: int, nat_a: str, nat_b: str, args, sem) -> dict:
    async with sem:
        lab = Lab(index, {"a": nat_a, "b": nat_b}, args.turnpike, args.turnpike_arg)
        row = {"site_a": nat_a, "site_b": nat_b, "expected": predicted(nat_a, nat_b)}
        t0 = time.monotonic()
        try:
            phases = row["phases"] = {}
            await lab.setup()
            phases["setup"] = round(time.monotonic() - t0, 2)
            row["natcheck"] = await lab.natcheck()
            phases["natcheck"] = round(time.monotonic() - t0, 2)
            if args.probe_cmd:
                row["probe"] = await lab.probe(args.probe_cmd)
            results = await lab.agents(args.count, args.settle)
            phases["agents"] = round(time.monotonic() - t0, 2)
            row["results"] = results
            shutdown = await lab.stop_turnpike()
            row["to_peer"] = counter(shutdown, "to_peer")
            row["to_client"] = counter(shutdown, "to_client")
            row["shutdown"] = shutdown
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            await lab.close()
            for site, lines in lab.nat_logs.items():
                row[f"nat_{site}"] = lines[-1] if lines else ""
        row["seconds"] = round(time.monotonic() - t0, 1)
        return row


# `turnpike probe` output lines (label, key).
PROBE_FIELDS = [
    ("local address", "local"),
    ("mapped address", "mapped"),
    ("server other address", "other"),
    ("mapping behaviour", "mapping"),
    ("filtering behaviour", "filtering"),
    ("hairpinning", "hairpinning"),
    ("NAT type", "type"),
    ("verdict", "verdict"),
]


def parse_probe(text: str) -> dict:
    fields = {}
    for line in text.splitlines():
        for label, key in PROBE_FIELDS:
            if line.startswith(label + " "):
                fields[key] = line[len(label):].strip()
                break
    return fields


async def run_probe_router(index: int, nat: str, args, sem) -> dict:
    """Probe mode: one site behind `nat`; natcheck.py, then `turnpike probe` from its host."""
    async with sem:
        lab = Lab(index, {"a": nat}, args.turnpike, args.turnpike_arg)
        row = {"nat": nat, "errors": []}
        t0 = time.monotonic()
        try:
            await lab.setup()
            row["natcheck"] = (await lab.natcheck())["a"]
            await lab.await_nat_discovery()
            # A negative test (no answer) waits RTO x TRIES; generous so that a loaded machine
            # (the suite runs tests in parallel) cannot turn a late answer into a missing one.
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", lab.ns["ha"], args.turnpike,
                "probe", "--server", f"{TURN_IP}:{TURN_PORT}", "--rto-ms", "500", "--tries", "4",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                preexec_fn=die_with_parent,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            row["output"] = out.decode(errors="replace").rstrip()
            if proc.returncode != 0:
                row["errors"].append(f"turnpike probe exited {proc.returncode}: "
                                     f"{err.decode(errors='replace').strip()}")
            row["fields"] = parse_probe(row["output"])
        except Exception as exc:
            row["errors"].append(f"{type(exc).__name__}: {exc}")
        finally:
            await lab.close()
            if lab.nat_logs.get("a"):
                row["nat_log"] = lab.nat_logs["a"]
        row["seconds"] = round(time.monotonic() - t0, 1)
        return row


def summarize_probe(row: dict) -> dict:
    nat, f, check = row["nat"], row.get("fields", {}), row.get("natcheck", {})
    errors = list(row["errors"])
    router = f"{check.get('mapping', '?')}/{check.get('filtering', '?')}"
    if (check.get("mapping"), check.get("filtering")) != BEHAVIOUR[nat]:
        errors.append(f"router ({nat}) measured {router} by natcheck.py, want {'/'.join(BEHAVIOUR[nat])}")
    got = (f.get("mapping"), f.get("filtering"), f.get("hairpinning"), f.get("type"))
    if got != PROBE_EXPECTED[nat]:
        errors.append(f"turnpike probe classified {nat} as {'/'.join(map(str, got))}, "
                      f"want {'/'.join(PROBE_EXPECTED[nat])}")
    return {
        "nat": nat,
        "router": router,
        "mapping": f.get("mapping", "?"),
        "filtering": f.get("filtering", "?"),
        "hairpinning": f.get("hairpinning", "?"),
        "classified": (f.get("type") or "?").replace(" ", "-"),
        "mapped": f.get("mapped", "?"),
        "other": f.get("other", "?").split()[0],
        "seconds": row["seconds"],
        "ok": str(not errors).lower(),
        "errors": errors,
    }


def probe_table(rows: list, summaries: list) -> str:
    head = ("router", "mapping", "filtering", "hairpinning", "NAT type (probe)")
    rows = [(s["nat"], s["mapping"], s["filtering"], s["hairpinning"],
             row.get("fields", {}).get("type", "?") + ("" if s["ok"] == "true" else " !"))
            for row, s in zip(rows, summaries)]
    widths = [max(len(r[i]) for r in [head] + rows) + 2 for i in range(len(head))]
    return "\n".join("".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows)


async def probe_main(args, sem) -> int:
    t0 = time.monotonic()
    tasks = [asyncio.create_task(run_probe_router(i, nat, args, sem))
             for i, nat in enumerate(args.probe_router)]
    rows = await gather_or_cancel(tasks)
    if rows is None:
        return 130
    summaries = [summarize_probe(r) for r in rows]
    for row, s in zip(rows, summaries):
        errors = s.pop("errors")
        print("NATPROBE " + " ".join(f"{k}={v}" for k, v in s.items()))
        for e in errors:
            print(f"  error: {e}")
        for line in row.get("output", "").splitlines():
            print(f"  probe: {line}")
        if row.get("nat_log") and (errors or os.environ.get("NATLAB_VERBOSE")):
            for line in row["nat_log"][-20:]:
                print(f"  nat: {line}")
    print()
    print("turnpike probe from the host behind each router (RFC 5780 against turnpike's "
          f"{TURN_IP}:{TURN_PORT} + {TURN_ALT_IP}:{TURN_ALT_PORT}); '!' marks a misclassification.")
    print(probe_table(rows, summaries))
    bad = [s for s in summaries if s["ok"] != "true"]
    print(f"natlab: {len(summaries) - len(bad)}/{len(summaries)} routers classified as configured "
          f"in {time.monotonic() - t0:.1f}s")
    return 1 if bad else 0


def summarize(row: dict) -> dict:
    res = row.get("results", {})
    a, b = res.get("a", {}), res.get("b", {})
    sel_a, sel_b = a.get("selected") or {}, b.get("selected") or {}
    types = [sel_a.get("local", {}).get("type"), sel_a.get("remote", {}).get("type")]
    via = "none"
    if sel_a:
        via = "relay" if "relay" in types else "direct"
    errors = [e for e in (row.get("error"), a.get("error"), b.get("error")) if e]
    check = row.get("natcheck", {})
    behaviour = {}
    for site, nat in (("a", row["site_a"]), ("b", row["site_b"])):
        got = check.get(site, {})
        behaviour[site] = f"{got.get('mapping', '?')}/{got.get('filtering', '?')}"
        if (got.get("mapping"), got.get("filtering")) != BEHAVIOUR[nat]:
            errors.append(f"router {site} ({nat}) measured {behaviour[site]}, want {'/'.join(BEHAVIOUR[nat])}")
    ok = (
        not errors
        and via == row["expected"]
        and a.get("received") == a.get("sent")
        and (via == "direct" or (row.get("to_peer", 0) >= a.get("sent", 1)
                                 and row.get("to_client", 0) >= a.get("sent", 1)))
    )
    return {
        "site_a": row["site_a"],
        "site_b": row["site_b"],
        "router_a": behaviour["a"],
        "router_b": behaviour["b"],
        "pair": "/".join(t or "none" for t in types),
        "via": via,
        "expected": row["expected"],
        "a_local": cand(sel_a.get("local")),
        "a_remote": cand(sel_a.get("remote")),
        "b_local": cand(sel_b.get("local")),
        "b_remote": cand(sel_b.get("remote")),
        "sent": a.get("sent", 0),
        "received": a.get("received", 0),
        "echoed": b.get("echoed", 0),
        "turnpike_to_peer": row.get("to_peer", -1),
        "turnpike_to_client": row.get("to_client", -1),
        "connect_ms": a.get("connect_ms", -1),
        "seconds": row["seconds"],
        "ok": str(ok and not errors).lower(),
        "errors": errors,
    }


async def cleanup_stale() -> None:
    """Removes namespaces (and their processes) left by an earlier run that was killed."""
    out = await run("ip", "netns", "list", check=False)
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or os.path.exists(f"/proc/{pid}")):
            continue
        pids = await run("ip", "netns", "pids", name, check=False)
        for p in pids.split():
            try:
                os.kill(int(p), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        await run("ip", "netns", "del", name, check=False)
        print(f"natlab: removed stale namespace {name}", file=sys.stderr)


async def remove_own_namespaces() -> None:
    """Safety net: whatever namespace of this run is still there goes."""
    out = await run("ip", "netns", "list", check=False)
    own = f"{PREFIX}{os.getpid()}-"
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(own):
            await run("ip", "netns", "del", name, check=False)


def matrix(summaries: list) -> str:
    cells = {(s["site_a"], s["site_b"]): s for s in summaries}
    width = max(len(n) for n in NATS) + 2
    lines = ["site A \\ site B".ljust(width) + "".join(n.ljust(width + 6) for n in NATS)]
    for a in NATS:
        line = a.ljust(width)
        for b in NATS:
            s = cells.get((a, b))
            text = "-" if s is None else f"{s['via']} {s['pair']}" + ("" if s["ok"] == "true" else " !")
            line += text.ljust(width + 6)
        lines.append(line)
    return "\n".join(lines)


async def gather_or_cancel(tasks: list):
    """Awaits the tasks; SIGTERM/SIGINT/SIGHUP cancel them (each removes its namespaces in its
    finally block). Returns their results, or None when interrupted."""
    interrupted = []

    def on_signal(sig):
        interrupted.append(sig)
        for t in tasks:
            t.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        rows = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await remove_own_namespaces()
    if interrupted:
        print(f"natlab: interrupted by signal {interrupted[0]}; namespaces removed", file=sys.stderr)
        return None
    for r in rows:
        if isinstance(r, BaseException):
            raise r
    return rows


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turnpike", required=True)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--settle", type=float, default=2.5)
    parser.add_argument("--only", action="append", default=[], help="NAT_A:NAT_B")
    parser.add_argument("--turnpike-arg", action="append", default=[],
                        help="extra turnpike flag (repeat; e.g. a data-plane setting)")
    parser.add_argument("--probe-cmd", default="",
                        help="shell command run in each site's host before ICE; {stun} is "
                             "turnpike's address (for the NAT behaviour discovery probe)")
    parser.add_argument("--probe-router", action="append", default=[], choices=NATS,
                        help="probe mode: one site behind this router, `turnpike probe` from its "
                             "host instead of ICE (repeat for several routers)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("natlab: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    args.turnpike = os.path.abspath(args.turnpike)
    await cleanup_stale()
    sem = asyncio.Semaphore(max(1, args.jobs))
    if args.probe_router:
        return await probe_main(args, sem)
    combos = [(a, b) for a in NATS for b in NATS]
    if args.only:
        combos = [tuple(o.split(":")) for o in args.only]
    t0 = time.monotonic()
    tasks = [
        asyncio.create_task(run_combination(i, a, b, args, sem)) for i, (a, b) in enumerate(combos)
    ]
    rows = await gather_or_cancel(tasks)
    if rows is None:
        return 130
    summaries = [summarize(r) for r in rows]
    for row, s in zip(rows, summaries):
        errors = s.pop("errors")
        print("NATLAB " + " ".join(f"{k}={v}" for k, v in s.items()))
        for e in errors:
            print(f"  error: {e}")
        for site in ("a", "b"):
            res = row.get("results", {}).get(site, {})
            if s["ok"] != "true" or os.environ.get("NATLAB_VERBOSE"):
                print(f"  {site}: {json.dumps(res)}")
            if row.get(f"nat_{site}"):
                print(f"  nat {site}: {row[f'nat_{site}']}")
            if row.get("probe"):
                print(f"  probe {site}: {row['probe'][site]}")
        if s["ok"] != "true" or os.environ.get("NATLAB_VERBOSE"):
            print(f"  turnpike: {row.get('shutdown', '')}")
            print(f"  phases (s since start, done): {row.get('phases')}")
    print()
    print("site A NAT x site B NAT -> pair ICE selected (A's local/remote candidate types); "
          "A controls. '!' marks a mismatch with the prediction.")
    print(matrix(summaries))
    bad = [s for s in summaries if s["ok"] != "true"]
    print(f"natlab: {len(summaries) - len(bad)}/{len(summaries)} combinations as predicted "
          f"in {time.monotonic() - t0:.1f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
