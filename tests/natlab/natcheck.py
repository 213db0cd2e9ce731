"""The NAT lab's check of its own routers, independent of turnpike and of ICE.

`natcheck.py reflect IP:PORT ...` runs on the public segment: every socket answers "map" with
the source address it saw ("mapped IP:PORT"), and "send-from IP:PORT TOKEN" by sending TOKEN
from that socket to the requester's observed address.

`natcheck.py probe` runs in a site's host namespace, from one UDP socket
(the RFC 4787 / RFC 5780 tests, with the reflector as the server of several addresses):
  mapping:   "map" to R1:P1, R1:P2 and R2:P1; all mapped addresses equal: endpoint-independent;
             equal for the same IP only: address-dependent; else address-and-port-dependent.
  filtering: the reflector sends from R3:P1 (an IP never contacted) and from R1:P3 (a contacted
             IP, a port never contacted); the first arrives: endpoint-independent; only the
             second: address-dependent; neither: address-and-port-dependent.
It prints one line: "NATCHECK mapping=... filtering=... mapped=IP:PORT".

The reflector addresses are fixed by the lab: R1=198.51.100.4, R2=198.51.100.5,
R3=198.51.100.6, P1=3479, P2=3480, P3=3481 (198.51.100.1 and .2 are turnpike's: its RFC 5780
listeners take ports 3478 and 3479 on both).
"""

import select
import socket
import sys
import time

R1, R2, R3 = "198.51.100.4", "198.51.100.5", "198.51.100.6"
P1, P2, P3 = 3479, 3480, 3481
REFLECTOR = [(R1, P1), (R1, P2), (R1, P3), (R2, P1), (R3, P1)]


def reflect() -> int:
    socks = {}
    for ip, port in REFLECTOR:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ip, port))
        socks[s.fileno()] = s
    by_addr = {s.getsockname(): s for s in socks.values()}
    print("ready", flush=True)
    poller = select.poll()
    for fd in socks:
        poller.register(fd, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            s = socks[fd]
            data, peer = s.recvfrom(2048)
            words = data.decode(errors="replace").split()
            if words[:1] == ["map"]:
                s.sendto(f"mapped {peer[0]}:{peer[1]} {words[1] if len(words) > 1 else ''}".encode(), peer)
            elif words[:1] == ["send-from"] and len(words) == 3:
                ip, port = words[1].rsplit(":", 1)
                src = by_addr.get((ip, int(port)))
                if src is not None:
                    src.sendto(words[2].encode(), peer)


def probe() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))

    def wait_for(token: str, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            s.settimeout(left)
            try:
                data, _ = s.recvfrom(2048)
            except socket.timeout:
                return None
            text = data.decode(errors="replace")
            if token in text:
                return text

    def mapped(server) -> str:
        for attempt in range(5):
            token = f"t{attempt}-{server[0]}-{server[1]}"
            s.sendto(f"map {token}".encode(), server)
            reply = wait_for(token, 0.3)
            if reply:
                return reply.split()[1]
        raise SystemExit(f"NATCHECK error: no answer from {server[0]}:{server[1]}")

    m1 = mapped((R1, P1))
    m2 = mapped((R1, P2))
    m3 = mapped((R2, P1))
    if m1 == m2 == m3:
        mapping = "endpoint-independent"
    elif m1 == m2:
        mapping = "address-dependent"
    else:
        mapping = "address-and-port-dependent"

    def arrives(src: str, token: str) -> bool:
        for _ in range(2):
            s.sendto(f"send-from {src} {token}".encode(), (R1, P1))
            if wait_for(token, 0.2):
                return True
        return False

    if arrives(f"{R3}:{P1}", "from-other-ip"):
        filtering = "endpoint-independent"
    elif arrives(f"{R1}:{P3}", "from-other-port"):
        filtering = "address-dependent"
    else:
        filtering = "address-and-port-dependent"
    print(f"NATCHECK mapping={mapping} filtering={filtering} mapped={m1}", flush=True)
    return 0


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "reflect":
        sys.exit(reflect())
    if mode == "probe":
        sys.exit(probe())
    raise SystemExit(__doc__)
