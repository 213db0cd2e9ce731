// SPDX-License-Identifier: Apache-2.0
//
// turnpike's XDP fast path for bound TURN channels over UDP (RFC 8656 §12).
//
// Two kinds of frames are rewritten in place and sent back out of the interface they came
// in on (XDP_TX):
//
//   client -> peer: Ethernet + IPv4/IPv6 + UDP to a listening address carrying ChannelData
//     (RFC 8656 §12.4) for a channel bound on that 5-tuple: the 4-byte ChannelData header is
//     stripped and the datagram leaves from the relayed transport address to the peer.
//   peer -> client: UDP from a peer to a relayed transport address with a channel bound to
//     that peer: a ChannelData header is prepended and the datagram leaves from the listening
//     address to the client.
//
// Everything else is XDP_PASS, unchanged: the user-space path is the reference behaviour.
// The maps are filled by user space (src/xdp/mod.rs) from the sans-IO server's events; the
// layouts below must match the encoders there byte for byte. Addresses are 16 bytes (IPv4 as
// IPv4-mapped IPv6, ::ffff:a.b.c.d), ports and channel numbers in network byte order.
//
// IP header fields follow RFC 8656 §14's preferred behaviour: TTL / hop limit one less than
// the incoming value (a datagram arriving with 0 or 1 is passed to the kernel), DSCP/ECN and
// the IPv4 DF bit copied, IPv6 flow label set to 0 (the alternate behaviour). Checksums are
// updated incrementally (RFC 1624), so a datagram that arrived with a wrong UDP checksum
// leaves with a wrong one and is dropped by the receiver, as the kernel would have.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define ETH_LEN 14
#define IP4_LEN 20
#define IP6_LEN 40
#define UDP_LEN 8
#define CD_LEN 4

// Entry flags (chan_val.flags, peer_val.flags).
#define FLAG_BANDWIDTH_CAPPED 1 // never forwarded here: the cap is enforced in user space
#define FLAG_IPV6 2             // the entry's addresses are IPv6 (else IPv4-mapped)

// The largest payload moved when the headroom cannot grow (in MOVE_CHUNK steps).
#define MOVE_CHUNK 256
#define MOVE_CHUNKS 40

// Listening transport addresses (server side of client 5-tuples).
struct listen_key {
    __u8 addr[16];
    __u16 port;
    __u16 pad;
};

// Client -> peer: (client, server, channel) -> (relayed, peer).
struct chan_key {
    __u8 client[16];
    __u8 server[16];
    __u16 client_port;
    __u16 server_port;
    __u16 channel;
    __u16 pad;
};

struct chan_val {
    __u8 relayed[16];
    __u8 peer[16];
    __u16 relayed_port;
    __u16 peer_port;
    __u32 flags;
    __u64 expires_ns; // bpf_ktime_get_ns() (CLOCK_MONOTONIC) deadline
    __u64 packets;    // datagrams forwarded by this program
    __u64 bytes;      // their application payload bytes
};

// Peer -> client: (relayed, peer) -> (client, server, channel).
struct peer_key {
    __u8 relayed[16];
    __u8 peer[16];
    __u16 relayed_port;
    __u16 peer_port;
};

struct peer_val {
    __u8 client[16];
    __u8 server[16];
    __u16 client_port;
    __u16 server_port;
    __u16 channel;
    __u16 flags;
    __u64 expires_ns;
    __u64 packets;
    __u64 bytes;
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 256);
    __type(key, struct listen_key);
    __type(value, __u32);
} listen SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, struct chan_key);
    __type(value, struct chan_val);
} channels SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, struct peer_key);
    __type(value, struct peer_val);
} peers SEC(".maps");

// Interface MTU (L3 bytes) by ingress ifindex: a peer datagram that would exceed it once the
// ChannelData header is added is passed to the kernel (which fragments). No entry: pass.
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, __u32);
    __type(value, __u32);
} mtu SEC(".maps");

// Scratch space for moving a payload (too large for the 512-byte stack).
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u8[MOVE_CHUNK]);
} scratch SEC(".maps");

// Set by the tests only: take the tail-growing path as if the headroom could not grow.
const volatile __u32 force_tail_grow = 0;

// Parsed headers of a candidate datagram. Addresses as in the maps.
struct pkt {
    __u8 eth_dst[6];
    __u8 eth_src[6];
    __u8 src[16];
    __u8 dst[16];
    __u16 sport; // network order
    __u16 dport; // network order
    __u16 udp_len; // host order, UDP header included
    __u16 udp_csum; // raw
    __u32 v6_vtc;  // IPv6: version, traffic class, flow label (raw)
    __u16 v4_id;   // IPv4: raw
    __u16 v4_frag; // IPv4: raw (only DF may be set)
    __u8 v4_tos;
    __u8 ttl;      // TTL / hop limit
    __u8 v6;
    __u8 pad;
};

static __always_inline __u32 csum_add(__u32 acc, __u16 w) { return acc + w; }
static __always_inline __u32 csum_sub(__u32 acc, __u16 w) { return acc + (__u16)~w; }

static __always_inline __u16 csum_fold(__u32 acc)
{
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    return (__u16)acc;
}

// Adds (or with sub, removes) the 16-bit words of an address: the last 4 bytes for IPv4.
static __always_inline __u32 csum_addr(__u32 acc, const __u8 *a, int v6, int sub)
{
    __u16 w[8];
    __builtin_memcpy(w, a, 16);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (!v6 && i < 6)
            continue;
        acc = sub ? csum_sub(acc, w[i]) : csum_add(acc, w[i]);
    }
    return acc;
}

static __always_inline void set_v4_mapped(__u8 *out, const void *v4)
{
    __builtin_memset(out, 0, 10);
    out[10] = 0xff;
    out[11] = 0xff;
    __builtin_memcpy(out + 12, v4, 4);
}

static __always_inline __u16 ip4_checksum(const __u8 *hdr)
{
    __u16 w[10];
    __u32 acc = 0;
    __builtin_memcpy(w, hdr, 20);
#pragma unroll
    for (int i = 0; i < 10; i++)
        acc += w[i];
    return ~csum_fold(acc);
}

// Parses Ethernet + IPv4 (no options, not a fragment) or IPv6 (UDP as the next header) + UDP
// whose lengths agree. Returns the offset of the UDP payload, or -1.
static __always_inline int parse(struct xdp_md *ctx, struct pkt *p)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u8 *eth = data;
    if ((void *)(eth + ETH_LEN) > data_end)
        return -1;
    __builtin_memcpy(p->eth_dst, eth, 6);
    __builtin_memcpy(p->eth_src, eth + 6, 6);
    __u16 proto;
    __builtin_memcpy(&proto, eth + 12, 2);
    __u8 *ip = eth + ETH_LEN;
    __u8 *udp;
    __u32 l3_payload;
    if (proto == bpf_htons(ETH_P_IP)) {
        if ((void *)(ip + IP4_LEN + UDP_LEN) > data_end)
            return -1;
        if (ip[0] != 0x45 || ip[9] != IPPROTO_UDP)
            return -1; // not IPv4 without options, or not UDP
        __u16 frag, tot;
        __builtin_memcpy(&frag, ip + 6, 2);
        if (frag & bpf_htons(0x3fff))
            return -1; // a fragment (MF or an offset)
        __builtin_memcpy(&tot, ip + 2, 2);
        tot = bpf_ntohs(tot);
        if (tot < IP4_LEN + UDP_LEN || (void *)(ip + tot) > data_end)
            return -1;
        l3_payload = tot - IP4_LEN;
        p->v6 = 0;
        p->v4_tos = ip[1];
        __builtin_memcpy(&p->v4_id, ip + 4, 2);
        p->v4_frag = frag;
        p->ttl = ip[8];
        set_v4_mapped(p->src, ip + 12);
        set_v4_mapped(p->dst, ip + 16);
        udp = ip + IP4_LEN;
    } else if (proto == bpf_htons(ETH_P_IPV6)) {
        if ((void *)(ip + IP6_LEN + UDP_LEN) > data_end)
            return -1;
        if ((ip[0] >> 4) != 6 || ip[6] != IPPROTO_UDP)
            return -1; // extension headers (fragments among them) go to the kernel
        __u16 plen;
        __builtin_memcpy(&plen, ip + 4, 2);
        plen = bpf_ntohs(plen);
        if (plen < UDP_LEN || (void *)(ip + IP6_LEN + plen) > data_end)
            return -1;
        l3_payload = plen;
        p->v6 = 1;
        __builtin_memcpy(&p->v6_vtc, ip, 4);
        p->ttl = ip[7];
        __builtin_memcpy(p->src, ip + 8, 16);
        __builtin_memcpy(p->dst, ip + 24, 16);
        udp = ip + IP6_LEN;
    } else {
        return -1; // VLAN tags, ARP, ...
    }
    __u16 ulen;
    __builtin_memcpy(&p->sport, udp, 2);
    __builtin_memcpy(&p->dport, udp + 2, 2);
    __builtin_memcpy(&ulen, udp + 4, 2);
    __builtin_memcpy(&p->udp_csum, udp + 6, 2);
    ulen = bpf_ntohs(ulen);
    if (ulen != l3_payload)
        return -1;
    if (p->v6 && p->udp_csum == 0)
        return -1; // mandatory over IPv6 (RFC 8200 §8.1): the kernel decides
    if (p->ttl <= 1)
        return -1;
    p->udp_len = ulen;
    return (int)((udp + UDP_LEN) - (__u8 *)data);
}

// Writes Ethernet (addresses swapped: the frame goes back out where it came from), the IP
// header and the UDP header (ports, length, checksum) at the start of the packet.
static __always_inline int write_headers(struct xdp_md *ctx, const struct pkt *p, const __u8 *src,
                                         const __u8 *dst, __u16 sport, __u16 dport,
                                         __u16 udp_len, __u16 udp_csum)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u8 *eth = data;
    if ((void *)(eth + ETH_LEN) > data_end)
        return -1;
    __builtin_memcpy(eth, p->eth_src, 6);
    __builtin_memcpy(eth + 6, p->eth_dst, 6);
    __u16 proto = p->v6 ? bpf_htons(ETH_P_IPV6) : bpf_htons(ETH_P_IP);
    __builtin_memcpy(eth + 12, &proto, 2);
    __u8 *ip = eth + ETH_LEN;
    __u8 *udp;
    if (p->v6) {
        if ((void *)(ip + IP6_LEN + UDP_LEN) > data_end)
            return -1;
        __u32 vtc = p->v6_vtc & bpf_htonl(0xfff00000); // flow label 0
        __u16 plen = bpf_htons(udp_len);
        __builtin_memcpy(ip, &vtc, 4);
        __builtin_memcpy(ip + 4, &plen, 2);
        ip[6] = IPPROTO_UDP;
        ip[7] = p->ttl - 1;
        __builtin_memcpy(ip + 8, src, 16);
        __builtin_memcpy(ip + 24, dst, 16);
        udp = ip + IP6_LEN;
    } else {
        if ((void *)(ip + IP4_LEN + UDP_LEN) > data_end)
            return -1;
        __u16 tot = bpf_htons(udp_len + IP4_LEN), zero = 0;
        ip[0] = 0x45;
        ip[1] = p->v4_tos;
        __builtin_memcpy(ip + 2, &tot, 2);
        __builtin_memcpy(ip + 4, &p->v4_id, 2);
        __builtin_memcpy(ip + 6, &p->v4_frag, 2);
        ip[8] = p->ttl - 1;
        ip[9] = IPPROTO_UDP;
        __builtin_memcpy(ip + 10, &zero, 2);
        __builtin_memcpy(ip + 12, src + 12, 4);
        __builtin_memcpy(ip + 16, dst + 12, 4);
        __u16 c = ip4_checksum(ip);
        __builtin_memcpy(ip + 10, &c, 2);
        udp = ip + IP4_LEN;
    }
    __u16 len = bpf_htons(udp_len);
    __builtin_memcpy(udp, &sport, 2);
    __builtin_memcpy(udp + 2, &dport, 2);
    __builtin_memcpy(udp + 4, &len, 2);
    __builtin_memcpy(udp + 6, &udp_csum, 2);
    return 0;
}

// The new UDP checksum after replacing addresses, ports and length, and removing (sub) or
// adding the ChannelData header words: RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m').
static __always_inline __u16 udp_csum_update(const struct pkt *p, const __u8 *src, const __u8 *dst,
                                             __u16 sport, __u16 dport, __u16 udp_len,
                                             __u16 cd_channel, __u16 cd_len, int cd_sub)
{
    if (!p->v6 && p->udp_csum == 0)
        return 0; // no checksum over IPv4 stays none (RFC 768)
    __u32 acc = (__u16)~p->udp_csum;
    acc = csum_addr(acc, p->src, p->v6, 1);
    acc = csum_addr(acc, p->dst, p->v6, 1);
    acc = csum_addr(acc, src, p->v6, 0);
    acc = csum_addr(acc, dst, p->v6, 0);
    acc = csum_sub(acc, p->sport);
    acc = csum_sub(acc, p->dport);
    acc = csum_add(acc, sport);
    acc = csum_add(acc, dport);
    // The length is in the pseudo-header and in the UDP header.
    __u16 old_len = bpf_htons(p->udp_len), new_len = bpf_htons(udp_len);
    acc = csum_sub(acc, old_len);
    acc = csum_sub(acc, old_len);
    acc = csum_add(acc, new_len);
    acc = csum_add(acc, new_len);
    if (cd_sub) {
        acc = csum_sub(acc, cd_channel);
        acc = csum_sub(acc, cd_len);
    } else {
        acc = csum_add(acc, cd_channel);
        acc = csum_add(acc, cd_len);
    }
    __u16 c = ~csum_fold(acc);
    return c == 0 ? 0xffff : c; // 0 means "none": send its ones'-complement twin
}

static __always_inline int live(__u64 expires_ns, __u32 flags, int v6)
{
    if (flags & FLAG_BANDWIDTH_CAPPED)
        return 0;
    if (!!(flags & FLAG_IPV6) != !!v6)
        return 0;
    return bpf_ktime_get_ns() < expires_ns;
}

// ChannelData from a client to a listening address -> UDP from the relayed address to the peer.
static __always_inline int to_peer(struct xdp_md *ctx, struct pkt *p, int off)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    if (off < 0 || off > ETH_LEN + IP6_LEN + UDP_LEN)
        return XDP_PASS;
    // 42 or 62. The mask (a no-op on those) gives the verifier the bound of the offset; the
    // empty asm keeps clang from dropping it as redundant with the test above.
    __u32 o = off;
    asm volatile("" : "+r"(o));
    o &= 0x3f;
    __u8 *cd = (__u8 *)data + o;
    if ((void *)(cd + CD_LEN) > data_end)
        return XDP_PASS;
    __u16 channel, len;
    __builtin_memcpy(&channel, cd, 2);
    __builtin_memcpy(&len, cd + 2, 2);
    // Channel numbers 0x4000-0x7FFF (RFC 8656 §12's 0x4000-0x4FFF and RFC 5766's rest, which
    // the server binds outside strict mode; only numbers it bound have entries); over UDP the
    // length covers the whole payload exactly (§12.5: no padding). Anything else is the kernel's.
    if ((bpf_ntohs(channel) & 0xc000) != 0x4000)
        return XDP_PASS;
    if ((__u32)bpf_ntohs(len) + CD_LEN + UDP_LEN != p->udp_len)
        return XDP_PASS;
    struct chan_key key = {};
    __builtin_memcpy(key.client, p->src, 16);
    __builtin_memcpy(key.server, p->dst, 16);
    key.client_port = p->sport;
    key.server_port = p->dport;
    key.channel = channel;
    struct chan_val *v = bpf_map_lookup_elem(&channels, &key);
    if (!v || !live(v->expires_ns, v->flags, p->v6))
        return XDP_PASS;
    __u8 src[16], dst[16];
    __builtin_memcpy(src, v->relayed, 16);
    __builtin_memcpy(dst, v->peer, 16);
    __u16 sport = v->relayed_port, dport = v->peer_port;
    __u16 udp_len = p->udp_len - CD_LEN;
    __u16 csum = udp_csum_update(p, src, dst, sport, dport, udp_len, channel, len, 1);
    if (bpf_xdp_adjust_head(ctx, CD_LEN))
        return XDP_PASS;
    if (write_headers(ctx, p, src, dst, sport, dport, udp_len, csum))
        return XDP_ABORTED; // cannot happen: the frame only moved by 4 bytes
    __sync_fetch_and_add(&v->packets, 1);
    __sync_fetch_and_add(&v->bytes, bpf_ntohs(len));
    return XDP_TX;
}

// Moves the `len` bytes at `off` 4 bytes towards the end (after the tail grew by 4), from the
// end backwards: the full MOVE_CHUNK-byte chunks first, last one first, then the partial chunk
// at the start. Each chunk is read whole before it is written, so the overlap is harmless.
static __always_inline int move_payload(struct xdp_md *ctx, __u32 off, __u32 len)
{
    __u32 zero = 0;
    __u8 *buf = bpf_map_lookup_elem(&scratch, &zero);
    if (!buf)
        return -1;
    __u32 full = len / MOVE_CHUNK;
    __u32 rest = len % MOVE_CHUNK;
    if (full > MOVE_CHUNKS)
        return -1;
#pragma clang loop unroll(disable)
    for (__u32 i = 0; i < MOVE_CHUNKS; i++) {
        if (i >= full)
            break;
        __u32 at = off + rest + (full - 1 - i) * MOVE_CHUNK;
        if (bpf_xdp_load_bytes(ctx, at, buf, MOVE_CHUNK))
            return -1;
        if (bpf_xdp_store_bytes(ctx, at + CD_LEN, buf, MOVE_CHUNK))
            return -1;
    }
    asm volatile("" : "+r"(rest)); // bound-check the register that goes to the helpers
    rest &= MOVE_CHUNK - 1;
    if (rest == 0)
        return 0;
    if (bpf_xdp_load_bytes(ctx, off, buf, rest))
        return -1;
    if (bpf_xdp_store_bytes(ctx, off + CD_LEN, buf, rest))
        return -1;
    return 0;
}

// UDP from a peer to a relayed address -> ChannelData from the listening address to the client.
static __always_inline int to_client(struct xdp_md *ctx, struct pkt *p, int off)
{
    struct peer_key key = {};
    __builtin_memcpy(key.relayed, p->dst, 16);
    __builtin_memcpy(key.peer, p->src, 16);
    key.relayed_port = p->dport;
    key.peer_port = p->sport;
    struct peer_val *v = bpf_map_lookup_elem(&peers, &key);
    if (!v || !live(v->expires_ns, v->flags, p->v6))
        return XDP_PASS;
    __u32 ifindex = ctx->ingress_ifindex;
    __u32 *m = bpf_map_lookup_elem(&mtu, &ifindex);
    __u32 hdr = p->v6 ? IP6_LEN : IP4_LEN;
    if (!m || (__u32)p->udp_len + hdr + CD_LEN > *m)
        return XDP_PASS; // too large for the link once framed: the kernel fragments
    __u16 payload = p->udp_len - UDP_LEN;
    if (payload > MOVE_CHUNK * MOVE_CHUNKS)
        return XDP_PASS;
    __u8 src[16], dst[16];
    __builtin_memcpy(src, v->server, 16);
    __builtin_memcpy(dst, v->client, 16);
    __u16 sport = v->server_port, dport = v->client_port, channel = v->channel;
    __u16 udp_len = p->udp_len + CD_LEN;
    __u16 cd_len = bpf_htons(payload);
    __u16 csum = udp_csum_update(p, src, dst, sport, dport, udp_len, channel, cd_len, 0);
    if (force_tail_grow || bpf_xdp_adjust_head(ctx, -CD_LEN)) {
        // No headroom (some drivers leave none): grow the tail and move the payload.
        if (off < 0 || off > ETH_LEN + IP6_LEN + UDP_LEN)
            return XDP_PASS;
        if (bpf_xdp_adjust_tail(ctx, CD_LEN))
            return XDP_PASS;
        if (move_payload(ctx, (__u32)off, payload))
            return XDP_ABORTED; // the frame is half-moved: drop it, counted by the kernel
    }
    if (write_headers(ctx, p, src, dst, sport, dport, udp_len, csum))
        return XDP_ABORTED;
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u8 *cd = (__u8 *)data + ETH_LEN + hdr + UDP_LEN;
    if ((void *)(cd + CD_LEN) > data_end)
        return XDP_ABORTED;
    __builtin_memcpy(cd, &channel, 2);
    __builtin_memcpy(cd + 2, &cd_len, 2);
    __sync_fetch_and_add(&v->packets, 1);
    __sync_fetch_and_add(&v->bytes, payload);
    return XDP_TX;
}

SEC("xdp")
int turnpike_xdp(struct xdp_md *ctx)
{
    struct pkt p = {};
    int off = parse(ctx, &p);
    if (off < 0)
        return XDP_PASS;
    struct listen_key lk = {};
    __builtin_memcpy(lk.addr, p.dst, 16);
    lk.port = p.dport;
    if (bpf_map_lookup_elem(&listen, &lk))
        return to_peer(ctx, &p, off);
    return to_client(ctx, &p, off);
}

char LICENSE[] SEC("license") = "Apache-2.0";
