"""aioice (PyPI) as an independent TURN client against a TURN server on loopback.

Allocates, then exchanges datagrams with a loopback echo peer twice:
  1. Send indications out, Data indications back (CreatePermission first, no channel);
  2. through a channel (aioice binds channel 0x4000 on its first sendto).
Checks which framing each reply arrived in, prints one JSON line with counts and RTTs,
and exits non-zero if any datagram is missing or arrived in the wrong framing.

The client reaches the server over UDP (default), TCP (`--transport tcp`, aioice's
turn_transport="tcp") or TLS over TCP (`--transport tls`, turn_ssl with a context that trusts
only `--ca FILE`, verifies the certificate against HOST, offers ALPN "stun.turn" and may be pinned
to one TLS version with `--tls-version 1.2|1.3`). The peer is always a UDP echo on 127.0.0.1.
For TLS the JSON line has "tls": {"version", "alpn", "cipher"}.

usage: aioice_turn.py HOST PORT USERNAME PASSWORD [COUNT]
                      [--transport udp|tcp|tls] [--ca FILE] [--tls-version 1.2|1.3]
"""

import argparse
import asyncio
import json
import ssl
import struct
import sys
import time

from aioice import stun, turn


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


class Receiver(asyncio.DatagramProtocol):
    def __init__(self):
        self.queue = asyncio.Queue()

    def connection_made(self, transport):
        pass

    def datagram_received(self, data, addr):
        self.queue.put_nowait((data, addr, time.monotonic()))

    def error_received(self, exc):
        self.queue.put_nowait((None, exc, time.monotonic()))


async def collect(queue, count, timeout=5.0):
    got = {}
    deadline = time.monotonic() + timeout
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            data, addr, t = await asyncio.wait_for(queue.get(), left)
        except asyncio.TimeoutError:
            break
        if data is None:
            raise RuntimeError(f"send failed: {addr}")
        got[data] = t
    return got


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("user")
    p.add_argument("password")
    p.add_argument("count", type=int, nargs="?", default=50)
    p.add_argument("--transport", choices=["udp", "tcp", "tls"], default="udp")
    p.add_argument("--ca", help="PEM file of the CA that signed the server certificate (TLS)")
    p.add_argument("--tls-version", choices=["1.2", "1.3"])
    a = p.parse_args()
    if a.transport == "tls" and not a.ca:
        p.error("--transport tls needs --ca")
    return a


def tls_context(ca, version):
    # Trusts only the test CA; hostname checking and CERT_REQUIRED are the defaults.
    ctx = ssl.create_default_context(cafile=ca)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    ctx.set_alpn_protocols(["stun.turn"])
    if version == "1.2":
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    elif version == "1.3":
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


async def main():
    args = parse_args()
    host, port, user, password, count = args.host, args.port, args.user, args.password, args.count
    loop = asyncio.get_running_loop()
    echo_transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    peer = echo_transport.get_extra_info("sockname")

    kwargs = {}
    if args.transport in ("tcp", "tls"):
        kwargs["transport"] = "tcp"
    if args.transport == "tls":
        kwargs["ssl"] = tls_context(args.ca, args.tls_version)
    transport, receiver = await asyncio.wait_for(
        turn.create_turn_endpoint(Receiver, server_addr=(host, port), username=user, password=password, **kwargs),
        10,
    )
    inner = transport._TurnTransport__inner_protocol
    framings = {"data_indication": 0, "channel_data": 0}
    original = inner.datagram_received

    def spy(data, addr):
        if turn.is_channel_data(data):
            framings["channel_data"] += 1
        else:
            try:
                m = stun.parse_message(data)
            except ValueError:
                m = None
            if m is not None and m.message_method == stun.Method.DATA:
                framings["data_indication"] += 1
                # aioice delivers Data indications only for peers it has a channel to;
                # hand them to the receiver ourselves.
                receiver.datagram_received(m.attributes["DATA"], m.attributes["XOR-PEER-ADDRESS"])
                return
        original(data, addr)

    inner.datagram_received = spy
    result = {
        "transport": args.transport,
        "relayed": list(transport.get_extra_info("sockname")),
        "peer": list(peer),
    }
    if args.transport == "tls":
        tls = inner.transport.get_extra_info("ssl_object")
        result["tls"] = {
            "version": tls.version(),
            "alpn": tls.selected_alpn_protocol(),
            "cipher": tls.cipher()[0],
        }

    # 1. Send/Data indications.
    perm = stun.Message(message_method=stun.Method.CREATE_PERMISSION, message_class=stun.Class.REQUEST)
    perm.attributes["XOR-PEER-ADDRESS"] = peer
    await asyncio.wait_for(inner.request_with_retry(perm), 10)
    sent = {}
    for i in range(count):
        payload = b"send-%06d" % i
        ind = stun.Message(message_method=stun.Method.SEND, message_class=stun.Class.INDICATION)
        ind.attributes["XOR-PEER-ADDRESS"] = peer
        ind.attributes["DATA"] = payload
        sent[payload] = time.monotonic()
        inner.send_stun(ind, (host, port))
        await asyncio.sleep(0.001)
    got = await collect(receiver.queue, count)
    rtts = sorted((got[p] - sent[p]) * 1e6 for p in got if p in sent)
    result["send_data"] = {
        "sent": count,
        "received": len([p for p in got if p in sent]),
        "via_data_indication": framings["data_indication"],
        "rtt_us_median": rtts[len(rtts) // 2] if rtts else None,
    }

    # 2. Channel (aioice binds a channel on the first sendto).
    sent = {}
    for i in range(count):
        payload = b"chan-%06d" % i
        sent[payload] = time.monotonic()
        transport.sendto(payload, peer)
        await asyncio.sleep(0.001)
    got = await collect(receiver.queue, count)
    rtts = sorted((got[p] - sent[p]) * 1e6 for p in got if p in sent)
    result["channel"] = {
        "sent": count,
        "received": len([p for p in got if p in sent]),
        "via_channel_data": framings["channel_data"],
        "channel": min(inner.channel_to_peer) if inner.channel_to_peer else None,
        "rtt_us_median": rtts[len(rtts) // 2] if rtts else None,
    }
    transport.close()
    await asyncio.sleep(0.2)
    echo_transport.close()
    print(json.dumps(result))
    ok = (
        result["send_data"]["received"] == count
        and result["send_data"]["via_data_indication"] >= count
        and result["channel"]["received"] == count
        and result["channel"]["via_channel_data"] >= count
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    asyncio.run(main())
