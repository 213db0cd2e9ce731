"""A small user-space UDP NAT for the NAT lab's router namespaces.

Linux netfilter expresses full cone (SNAT + a DMZ DNAT), port-restricted cone (MASQUERADE) and
symmetric (MASQUERADE --random-fully), but not address-dependent filtering: conntrack admits
inbound packets only on an existing 5-tuple. This program is the lab's restricted cone:

  mapping:   endpoint-independent. One external port per internal (IP, port), the internal port
             itself when free (port preservation, like Linux NAT), reused for every destination.
  filtering: address-dependent (default): a packet from R_IP:R_PORT to the external port is let
             in when the internal endpoint has sent anything to R_IP, whatever the port.
             `--filtering endpoint` (full cone) and `--filtering address-port` (port-restricted)
             exist to check the program against netfilter; the lab uses `address`.

How it moves packets: the router's kernel forwarding is off (net.ipv4.ip_forward=0) and
iptables rules in the raw table drop UDP arriving on the LAN and WAN interfaces (so the kernel
neither forwards it nor answers with ICMP errors). Packets are read from AF_PACKET sockets on the LAN
and WAN interfaces (they see frames before the IP layer), rewritten (IP source or
destination, UDP port, UDP checksum 0, which IPv4 allows) and sent through a raw IPPROTO_RAW
socket, so the kernel routes them and resolves the next hop. Only UDP is translated.

usage: userspace_nat.py LAN_IF LAN_CIDR WAN_IF WAN_IP [--filtering address|endpoint|address-port]
Prints "ready" once its sockets are open; logs one line per new mapping and per refused packet
(to stderr) and a summary when terminated.
"""

import ipaddress
import random
import select
import signal
import socket
import struct
import sys

ETH_P_IP = 0x0800
PACKET_OUTGOING = 4


def main() -> int:
    args = sys.argv[1:]
    filtering = "address"
    if "--filtering" in args:
        i = args.index("--filtering")
        filtering = args[i + 1]
        del args[i : i + 2]
    if filtering not in ("address", "endpoint", "address-port"):
        raise SystemExit(f"unknown filtering {filtering}")
    lan_if, lan_cidr, wan_if, wan_ip = args
    lan_net = ipaddress.ip_network(lan_cidr, strict=False)
    wan_raw = socket.inet_aton(wan_ip)

    def capture(ifname: str) -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        s.bind((ifname, ETH_P_IP))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        return s

    lan = capture(lan_if)
    wan = capture(wan_if)
    out = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)

    # (internal ip bytes, internal port) -> external port, and back
    mapping: dict[tuple[bytes, int], int] = {}
    reverse: dict[int, tuple[bytes, int]] = {}
    # external port -> set of remote IPs (address) or (ip, port) (address-port) it sent to
    contacted: dict[int, set] = {}
    stats = {"out": 0, "in": 0, "refused": 0, "mappings": 0}

    def log(msg: str) -> None:
        sys.stderr.write(f"userspace_nat: {msg}\n")
        sys.stderr.flush()

    def external_port(key: tuple[bytes, int]) -> int:
        port = mapping.get(key)
        if port is None:
            port = key[1] if key[1] not in reverse else None
            while port is None or port in reverse:
                port = random.randint(1024, 65535)
            mapping[key] = port
            reverse[port] = key
            contacted[port] = set()
            stats["mappings"] += 1
            log(f"map {socket.inet_ntoa(key[0])}:{key[1]} -> {wan_ip}:{port}")
        return port

    def parse(pkt: bytes):
        if len(pkt) < 28 or pkt[0] >> 4 != 4 or pkt[9] != socket.IPPROTO_UDP:
            return None
        ihl = (pkt[0] & 0x0F) * 4
        frag = struct.unpack("!H", pkt[6:8])[0]
        if frag & 0x1FFF or frag & 0x2000:  # fragments: not handled
            return None
        total = struct.unpack("!H", pkt[2:4])[0]
        pkt = pkt[:total]
        src, dst = pkt[12:16], pkt[16:20]
        sport, dport = struct.unpack("!HH", pkt[ihl : ihl + 4])
        return bytearray(pkt), ihl, src, dst, sport, dport

    def send(pkt: bytearray, ihl: int, dst: bytes) -> None:
        pkt[10:12] = b"\0\0"  # the kernel fills the IP header checksum (IP_HDRINCL)
        pkt[ihl + 6 : ihl + 8] = b"\0\0"  # no UDP checksum
        try:
            out.sendto(bytes(pkt), (socket.inet_ntoa(dst), 0))
        except OSError as exc:
            log(f"send to {socket.inet_ntoa(dst)} failed: {exc}")

    def outbound(raw: bytes) -> None:
        p = parse(raw)
        if p is None:
            return
        pkt, ihl, src, dst, sport, dport = p
        if ipaddress.ip_address(src) not in lan_net or ipaddress.ip_address(dst) in lan_net:
            return
        port = external_port((src, sport))
        contacted[port].add(dst if filtering == "address" else (dst, dport))
        pkt[12:16] = wan_raw
        pkt[ihl : ihl + 2] = struct.pack("!H", port)
        stats["out"] += 1
        send(pkt, ihl, dst)

    def inbound(raw: bytes) -> None:
        p = parse(raw)
        if p is None:
            return
        pkt, ihl, src, dst, sport, dport = p
        if dst != wan_raw:
            return
        key = reverse.get(dport)
        allowed = key is not None and (
            filtering == "endpoint"
            or (filtering == "address" and src in contacted[dport])
            or (filtering == "address-port" and (src, sport) in contacted[dport])
        )
        if not allowed:
            stats["refused"] += 1
            log(f"refuse {socket.inet_ntoa(src)}:{sport} -> {wan_ip}:{dport}")
            return
        pkt[16:20] = key[0]
        pkt[ihl + 2 : ihl + 4] = struct.pack("!H", key[1])
        stats["in"] += 1
        send(pkt, ihl, key[0])

    running = True

    def stop(*_):
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    poller = select.poll()
    poller.register(lan, select.POLLIN)
    poller.register(wan, select.POLLIN)
    while running:
        try:
            events = poller.poll(200)
        except InterruptedError:
            continue
        for fd, _ in events:
            sock = lan if fd == lan.fileno() else wan
            while True:
                try:
                    data, addr = sock.recvfrom(65535, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                if sock is lan:
                    outbound(data)
                else:
                    inbound(data)
    log(
        f"filtering={filtering} mappings={stats['mappings']} out={stats['out']} "
        f"in={stats['in']} refused={stats['refused']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
