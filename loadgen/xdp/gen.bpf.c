// SPDX-License-Identifier: Apache-2.0
//
// The programs of loadgen's `xdp-gen` (loadgen/src/bin/xdp_gen.rs, feature `xdp`).
//
// xdp_gen_tx: run by BPF_PROG_RUN with BPF_F_TEST_XDP_LIVE_FRAMES on a frame built in user
//   space, with ctx_in's ingress_ifindex = the generator's interface. It paces the frames (a
//   token bucket on bpf_ktime_get_ns: a frame ahead of schedule is XDP_DROP, so frames leave
//   evenly spaced, or in bursts of gen_cfg.burst), overwrites the first TMPL_LEN bytes with the
//   next flow's template (rotating over the flows: addresses, ports, channel or route, IP id,
//   checksums; the rest of the frame is the same for every flow) and returns XDP_TX. In
//   live-frames mode XDP_TX transmits out of the ingress interface, so over a veth each frame
//   reaches the relay's end as an xdp_frame, as a NIC driver hands it over: no skb, no copy.
//   The template is written on every run because the kernel recycles a frame's page without
//   restoring its bytes, and the relay may have rewritten them (turnpike's XDP program moves the
//   headers and swaps the MACs of the very page it sends back).
//   xdp-gen also attaches this program to an idle interface (--anchor): BPF_PROG_RUN of an XDP
//   program that is attached nowhere adds it to and removes it from the kernel's XDP dispatcher
//   around every call, two RCU grace periods (~20 ms here) per call.
//
// xdp_gen_sink: attached (native) to the generator's interface for the run. It counts and drops
//   the datagrams the relay delivers back, recognised by loadgen's payload magic "LGv1" at bytes
//   16..20 of the payload: either the UDP payload itself (a relayed datagram to a peer, or the
//   bare forwarder's output) or the payload of a ChannelData message (to a client). Everything
//   else (STUN, ARP, the bare forwarder's acks) is XDP_PASS, so that the setup traffic and the
//   refreshes of the allocations still work. A veth delivers a peer's XDP_TX'd frames only to an
//   interface with an XDP program, so this program is also what lets turnpike's XDP output in.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// Counters, per CPU: packets then bytes (whole frames) of each kind.
#define COUNT_RAW_PACKETS 0
#define COUNT_RAW_BYTES 1
#define COUNT_CD_PACKETS 2
#define COUNT_CD_BYTES 3

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 4);
    __type(key, __u32);
    __type(value, __u64);
} sink_count SEC(".maps");

// Set by user space before each run (one entry).
struct gen_cfg {
    __u64 interval_ns; // between bursts; 0: as fast as the program runs
    __u64 slack_ns;    // most backlog caught up at once (after a gap between calls)
    __u32 base;        // first template of this run
    __u32 count;       // templates in rotation; 0: the frame is sent as given
    __u32 burst;       // frames per burst (1: evenly spaced)
    __u32 pad;
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct gen_cfg);
} gen_cfg SEC(".maps");

// Per CPU: the pacing schedule, the rotation, and what was sent or held back.
struct gen_state {
    __u64 next_ns;
    __u64 seq;
    __u64 sent;
    __u64 paced;  // runs held back (XDP_DROP) by the pacing
    __u64 budget; // frames of the current burst still to send
};

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct gen_state);
} gen_state SEC(".maps");

// The first TMPL_LEN bytes of each flow's frame (Ethernet, IPv4, UDP headers and the first 14
// bytes of the UDP payload); max_entries set by the loader.
#define TMPL_WORDS 7
#define TMPL_LEN (TMPL_WORDS * 8)
struct tmpl {
    __u64 w[TMPL_WORDS];
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct tmpl);
} templates SEC(".maps");

#define ETH_LEN 14
#define IP4_LEN 20
#define UDP_LEN 8
#define CD_LEN 4
// "LGv1" read as a little-endian u32 (loadgen/src/payload.rs MAGIC).
#define MAGIC 0x3176474cU

static __always_inline void count(__u32 what, __u64 bytes) {
    __u64 *v = bpf_map_lookup_elem(&sink_count, &what);
    if (v)
        *v += 1;
    what += 1;
    v = bpf_map_lookup_elem(&sink_count, &what);
    if (v)
        *v += bytes;
}

SEC("xdp")
int xdp_gen_tx(struct xdp_md *ctx) {
    __u32 zero = 0;
    struct gen_cfg *cfg = bpf_map_lookup_elem(&gen_cfg, &zero);
    struct gen_state *st = bpf_map_lookup_elem(&gen_state, &zero);
    if (!cfg || !st)
        return XDP_DROP;
    if (cfg->interval_ns) {
        if (st->budget) {
            st->budget -= 1;
        } else {
            __u64 now = bpf_ktime_get_ns();
            __u64 next = st->next_ns;
            if (now < next) {
                st->paced += 1;
                return XDP_DROP;
            }
            if (next + cfg->slack_ns < now)
                next = now - cfg->slack_ns;
            st->next_ns = next + cfg->interval_ns;
            st->budget = cfg->burst > 1 ? cfg->burst - 1 : 0;
        }
    }
    __u32 count = cfg->count;
    if (count) {
        __u32 i = cfg->base + (__u32)(st->seq % count);
        st->seq += 1;
        struct tmpl *t = bpf_map_lookup_elem(&templates, &i);
        void *data = (void *)(long)ctx->data;
        void *end = (void *)(long)ctx->data_end;
        if (!t || data + TMPL_LEN > end)
            return XDP_DROP;
        __u64 *w = data;
#pragma unroll
        for (int k = 0; k < TMPL_WORDS; k++)
            w[k] = t->w[k];
    }
    st->sent += 1;
    return XDP_TX;
}

SEC("xdp")
int xdp_gen_sink(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    __u64 len = (__u64)(end - data);
    __u8 *p = data;
    // Ethernet + IPv4 without options + UDP + 20 bytes (a payload header with the magic).
    if (data + ETH_LEN + IP4_LEN + UDP_LEN + 20 > end)
        return XDP_PASS;
    if (p[12] != 0x08 || p[13] != 0x00) // EtherType IPv4
        return XDP_PASS;
    if (p[ETH_LEN] != 0x45 || p[ETH_LEN + 9] != IPPROTO_UDP)
        return XDP_PASS;
    __u8 *u = p + ETH_LEN + IP4_LEN + UDP_LEN;
    __u32 raw = (__u32)u[16] | ((__u32)u[17] << 8) | ((__u32)u[18] << 16) | ((__u32)u[19] << 24);
    if (raw == MAGIC) {
        count(COUNT_RAW_PACKETS, len);
        return XDP_DROP;
    }
    if (data + ETH_LEN + IP4_LEN + UDP_LEN + CD_LEN + 20 > end)
        return XDP_PASS;
    __u32 cd = (__u32)u[20] | ((__u32)u[21] << 8) | ((__u32)u[22] << 16) | ((__u32)u[23] << 24);
    if ((u[0] & 0xC0) == 0x40 && cd == MAGIC) {
        count(COUNT_CD_PACKETS, len);
        return XDP_DROP;
    }
    return XDP_PASS;
}

char LICENSE[] SEC("license") = "Apache-2.0";
