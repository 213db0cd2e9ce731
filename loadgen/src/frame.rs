//! Ethernet frames carrying IPv4 + UDP with correct checksums, as a NIC would hand them to a
//! driver: what `xdp-gen` (feature `xdp`) injects with BPF_PROG_RUN's live-frames mode. Plus
//! the frames of one flow of a [`FlowList`]: the client's ChannelData (or the bare
//! forwarder's raw datagram) and the peer's datagram to the relayed address.

use std::net::SocketAddrV4;

use turnpike::proto::channel_data::ChannelData;

use crate::flows::{Flow, FlowList};
use crate::payload;

/// Ethernet header length (no VLAN tag), bytes.
pub const ETH_LEN: usize = 14;
/// IPv4 header length (no options), bytes.
pub const IPV4_LEN: usize = 20;
/// UDP header length, bytes.
pub const UDP_LEN: usize = 8;
/// TTL of generated datagrams.
pub const TTL: u8 = 64;

/// One's-complement sum of `data` as big-endian 16-bit words (an odd last byte padded with
/// zero), added to `sum`, not folded.
pub fn ones_sum(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        // Fold early so that any length fits in 32 bits.
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    if let [b] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*b) << 8);
    }
    sum
}

/// Folds a [`ones_sum`] to 16 bits and complements it: the Internet checksum (RFC 1071).
pub fn finish(mut sum: u32) -> u16 {
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame with an IPv4 header (no options, DF set, IP identification `id`) and a
/// UDP header around `payload`; IP and UDP checksums computed (a UDP checksum of 0 is sent as
/// 0xFFFF, RFC 768).
///
/// # Panics
/// When `payload` does not fit in one IPv4 datagram.
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    id: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = UDP_LEN + payload.len();
    let ip_len = IPV4_LEN + udp_len;
    assert!(ip_len <= 65_535, "payload too large for IPv4");
    let mut f = Vec::with_capacity(ETH_LEN + ip_len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(ip_len as u16).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&0x4000u16.to_be_bytes());
    f.extend_from_slice(&[TTL, 17, 0, 0]);
    f.extend_from_slice(&src.ip().octets());
    f.extend_from_slice(&dst.ip().octets());
    let csum = finish(ones_sum(0, &f[ip..ip + IPV4_LEN]));
    f[ip + 10..ip + 12].copy_from_slice(&csum.to_be_bytes());
    let udp = f.len();
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    // Pseudo-header: source, destination, zero + protocol, UDP length.
    let mut sum = ones_sum(0, &f[ip + 12..ip + 20]);
    sum = ones_sum(sum, &[0, 17]);
    sum = ones_sum(sum, &(udp_len as u16).to_be_bytes());
    sum = ones_sum(sum, &f[udp..]);
    let csum = match finish(sum) {
        0 => 0xFFFF,
        c => c,
    };
    f[udp + 6..udp + 8].copy_from_slice(&csum.to_be_bytes());
    f
}

/// A loadgen payload of `size` bytes for global channel index `index` (sequence 0, time 0):
/// what the bare forwarder routes on and what `xdp-gen`'s sink recognises.
pub fn test_payload(index: u32, size: usize) -> Vec<u8> {
    let mut p = vec![0u8; size.max(payload::MIN_SIZE)];
    payload::write(
        &mut p,
        payload::Header {
            channel: index,
            seq: 0,
            sent_ns: 0,
        },
    );
    p
}

/// The frame a flow's client sends to the server: ChannelData on the flow's channel (TURN) or
/// the raw payload (bare forwarder), `size` payload bytes.
pub fn client_frame(list: &FlowList, flow: &Flow, src_mac: [u8; 6], dst_mac: [u8; 6], size: usize) -> Vec<u8> {
    let p = test_payload(flow.index, size);
    let data = match flow.channel {
        Some(ch) => {
            let mut d = ChannelData::header(ch, p.len() as u16).to_vec();
            d.extend_from_slice(&p);
            d
        }
        None => p,
    };
    udp_frame(src_mac, dst_mac, flow.client, list.server, flow.index as u16, &data)
}

/// The frame a flow's peer sends to its relayed address (the bare forwarder's address in raw
/// mode), `size` payload bytes.
pub fn peer_frame(flow: &Flow, src_mac: [u8; 6], dst_mac: [u8; 6], size: usize) -> Vec<u8> {
    let p = test_payload(flow.index, size);
    udp_frame(src_mac, dst_mac, flow.peer, flow.relayed, flow.index as u16, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071's checksum written independently: 32-bit accumulation of every 16-bit word
    /// (odd byte padded), then end-around carries.
    fn reference_checksum(parts: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let mut sum: u64 = 0;
        let mut i = 0;
        while i < bytes.len() {
            let hi = u64::from(bytes[i]);
            let lo = u64::from(*bytes.get(i + 1).unwrap_or(&0));
            sum += (hi << 8) | lo;
            i += 2;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// Checks IP and UDP checksums of `f` from scratch; returns the UDP payload.
    fn verify(f: &[u8]) -> &[u8] {
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        let ip = &f[ETH_LEN..ETH_LEN + IPV4_LEN];
        assert_eq!(reference_checksum(&[ip]), 0, "IPv4 header checksum");
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        assert_eq!(total, f.len() - ETH_LEN);
        let udp = &f[ETH_LEN + IPV4_LEN..];
        let udp_len = u16::from_be_bytes([udp[4], udp[5]]);
        assert_eq!(usize::from(udp_len), udp.len());
        assert_ne!(&udp[6..8], &[0, 0], "UDP checksum present");
        let pseudo = [&ip[12..20], &[0, 17], &udp_len.to_be_bytes()[..], udp];
        assert_eq!(reference_checksum(&pseudo), 0, "UDP checksum");
        &udp[UDP_LEN..]
    }

    #[test]
    fn known_ipv4_header_checksum() {
        // The classic example: 45 00 00 73 00 00 40 00 40 11 [b8 61] c0 a8 00 01 c0 a8 00 c7.
        let h = hex("450000730000400040110000c0a80001c0a800c7");
        assert_eq!(finish(ones_sum(0, &h)), 0xb861);
        assert_eq!(reference_checksum(&[&h]), 0xb861);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn frames_carry_valid_checksums() {
        let a: SocketAddrV4 = "198.18.1.7:40123".parse().unwrap();
        let b: SocketAddrV4 = "198.18.0.1:3478".parse().unwrap();
        let mac1 = [2, 0, 0, 0, 0, 1];
        let mac2 = [2, 0, 0, 0, 0, 2];
        // Even and odd payload lengths, and payloads of every byte value.
        for len in [0usize, 1, 20, 21, 100, 101, 1400] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 37 + 255) as u8).collect();
            for id in [0u16, 1, 0xFFFF] {
                let f = udp_frame(mac1, mac2, a, b, id, &payload);
                assert_eq!(&f[0..6], &mac2);
                assert_eq!(&f[6..12], &mac1);
                assert_eq!(verify(&f), &payload[..]);
                assert_eq!(&f[ETH_LEN + 12..ETH_LEN + 16], &a.ip().octets());
                assert_eq!(&f[ETH_LEN + IPV4_LEN..ETH_LEN + IPV4_LEN + 2], &a.port().to_be_bytes());
                assert_eq!(
                    &f[ETH_LEN + IPV4_LEN + 2..ETH_LEN + IPV4_LEN + 4],
                    &b.port().to_be_bytes()
                );
            }
        }
        // A payload whose UDP checksum computes to 0 is sent as 0xFFFF; search one.
        let mut found = false;
        for x in 0..=u16::MAX {
            let f = udp_frame(mac1, mac2, a, b, 0, &x.to_be_bytes());
            let c = &f[ETH_LEN + IPV4_LEN + 6..ETH_LEN + IPV4_LEN + 8];
            if c == [0xFF, 0xFF] {
                verify(&f);
                found = true;
                break;
            }
        }
        assert!(found, "a two-byte payload reaches every checksum value");
    }

    #[test]
    fn flow_frames() {
        let list = FlowList {
            mode: "turn".into(),
            server: "198.18.0.1:3478".parse().unwrap(),
            size: 100,
            flows: vec![Flow {
                client: "198.18.1.1:40000".parse().unwrap(),
                channel: Some(0x4001),
                index: 9,
                peer: "198.18.2.1:50000".parse().unwrap(),
                relayed: "198.18.0.1:49999".parse().unwrap(),
            }],
        };
        let fl = &list.flows[0];
        let f = client_frame(&list, fl, [2; 6], [4; 6], 100);
        let d = verify(&f);
        assert_eq!(&d[..4], &[0x40, 0x01, 0, 100]);
        assert_eq!(payload::read(&d[4..]).unwrap().channel, 9);
        let f = peer_frame(fl, [2; 6], [4; 6], 100);
        assert_eq!(&f[ETH_LEN + 16..ETH_LEN + 20], &[198, 18, 0, 1]);
        let d = verify(&f);
        assert_eq!(d.len(), 100);
        assert_eq!(payload::route_id(d), Some(9));
        let raw = Flow { channel: None, ..*fl };
        let f = client_frame(&list, &raw, [2; 6], [4; 6], 20);
        assert_eq!(payload::route_id(verify(&f)), Some(9));
    }
}
