//! Crafted Ethernet frames for datapath tests and benchmarks (BPF_PROG_TEST_RUN).
//!
//! Checksums are left zero: the programs never look at them.
use std::net::IpAddr;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    Icmp {
        icmp_type: u8,
        id: u16,
    },
    /// Any other IP protocol, with this many payload bytes.
    Other {
        protocol: u8,
    },
}

impl L4 {
    fn protocol(&self, v6: bool) -> u8 {
        match self {
            Self::Tcp { .. } => 6,
            Self::Udp { .. } => 17,
            Self::Sctp { .. } => 132,
            Self::Icmp { .. } if v6 => 58,
            Self::Icmp { .. } => 1,
            Self::Other { protocol } => *protocol,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match *self {
            Self::Tcp { sport, dport, flags } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h
            }
            Self::Udp { sport, dport } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..6].copy_from_slice(&8u16.to_be_bytes());
                h
            }
            Self::Sctp { sport, dport } => {
                let mut h = vec![0u8; 12];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h
            }
            Self::Icmp { icmp_type, id } => {
                let mut h = vec![0u8; 8];
                h[0] = icmp_type;
                h[4..6].copy_from_slice(&id.to_be_bytes());
                h
            }
            Self::Other { .. } => vec![0u8; 8],
        }
    }
}

/// An Ethernet frame of `ethertype` carrying `parts`, one after another.
fn ethernet(ethertype: u16, parts: &[&[u8]]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&ethertype.to_be_bytes());
    for part in parts {
        f.extend_from_slice(part);
    }
    f
}

/// An IPv4 or IPv6 packet (by the family of `src`) in an Ethernet frame.
pub fn ip(src: IpAddr, dst: IpAddr, l4: L4) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_with(s.octets(), d.octets(), l4, &[], 0),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_with(s.octets(), d.octets(), l4, &[]),
        _ => panic!("mixed address families: {src} -> {dst}"),
    }
}

pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    ip(src, dst, L4::Tcp { sport, dport, flags })
}

/// IPv4 with `options` (a multiple of 4 bytes) and a raw fragment field (flags + offset).
pub fn ipv4_with(src: [u8; 4], dst: [u8; 4], l4: L4, options: &[u8], frag: u16) -> Vec<u8> {
    assert!(
        options.len().is_multiple_of(4) && options.len() <= 40,
        "IPv4 options must be 0-40 bytes, whole words"
    );
    let payload = l4.bytes();
    let ihl = 20 + options.len();
    let mut h = vec![0u8; 20];
    h[0] = 0x40 | (ihl / 4) as u8;
    h[2..4].copy_from_slice(&((ihl + payload.len()) as u16).to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = l4.protocol(false);
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    ethernet(0x0800, &[&h, options, &payload])
}

/// IPv6 with extension headers given as (next-header number of the header, its bytes); each
/// header's own "next header" byte is filled in.
pub fn ipv6_with(src: [u8; 16], dst: [u8; 16], l4: L4, ext: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let payload = l4.bytes();
    let mut chain = Vec::new();
    let mut first_next = l4.protocol(true);
    for (i, (kind, bytes)) in ext.iter().enumerate() {
        if i == 0 {
            first_next = *kind;
        }
        let mut b = bytes.clone();
        b[0] = ext.get(i + 1).map(|(k, _)| *k).unwrap_or(l4.protocol(true));
        chain.extend(b);
    }
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&((chain.len() + payload.len()) as u16).to_be_bytes());
    h[6] = first_next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src);
    h[24..40].copy_from_slice(&dst);
    ethernet(0x86dd, &[&h, &chain, &payload])
}

/// `frame` with 802.1Q/802.1ad tags inserted after the MAC addresses, outermost first: each tag
/// is its TPID (0x8100 802.1Q, 0x88a8 802.1ad) and a TCI of 0 (priority 0, VID 0).
pub fn vlan_tagged(tpids: &[u16], frame: &[u8]) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    for tpid in tpids {
        out.extend_from_slice(&tpid.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
    out.extend_from_slice(&frame[12..]);
    out
}

/// `frame` with its ethertype replaced.
pub fn with_ethertype(ethertype: u16, frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[12..14].copy_from_slice(&ethertype.to_be_bytes());
    out
}

/// An ARP request.
pub fn arp() -> Vec<u8> {
    ethernet(0x0806, &[&[0, 1, 8, 0, 6, 4, 0, 1], &[0u8; 20]])
}

/// An ARP request whose sender protocol address is `sender`.
pub fn arp_from(sender: [u8; 4]) -> Vec<u8> {
    let mut f = arp();
    f[28..32].copy_from_slice(&sender);
    f
}

/// An ICMP (ICMPv6 by the family of `src`) error of `icmp_type`/`code` quoting `quoted`, an IP
/// packet (a frame from this module without its Ethernet header).
pub fn icmp_error(src: IpAddr, dst: IpAddr, icmp_type: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut f = ip(src, dst, L4::Icmp { icmp_type, id: 0 });
    let icmp = if src.is_ipv4() { 14 + 20 } else { 14 + 40 };
    f[icmp + 1] = code;
    f.extend_from_slice(quoted);
    set_ip_length(&mut f, src.is_ipv6());
    f
}

/// Rewrites the IP length field (IPv4 total length, IPv6 payload length) to the frame's size.
fn set_ip_length(f: &mut [u8], v6: bool) {
    if v6 {
        let len = (f.len() - 14 - 40) as u16;
        f[18..20].copy_from_slice(&len.to_be_bytes());
    } else {
        let len = (f.len() - 14) as u16;
        f[16..18].copy_from_slice(&len.to_be_bytes());
    }
}

/// `frame` (plain IPv4 from this module) as a fragment of datagram `id`: `offset` bytes into it
/// (a multiple of 8), with the more-fragments flag `more`. A later fragment carries the original
/// transport bytes as its data; the programs never read a later fragment's payload.
pub fn ipv4_fragment(frame: &[u8], id: u16, offset: u16, more: bool) -> Vec<u8> {
    assert!(offset.is_multiple_of(8), "fragment offsets are in 8-octet units");
    let mut f = frame.to_vec();
    f[18..20].copy_from_slice(&id.to_be_bytes());
    let field = (offset / 8) | if more { 0x2000 } else { 0 };
    f[20..22].copy_from_slice(&field.to_be_bytes());
    f
}

/// `frame` (plain IPv6 from this module, no extension headers) with a fragment header: datagram
/// `id`, `offset` bytes into it, more-fragments flag `more`.
pub fn ipv6_fragment(frame: &[u8], id: u32, offset: u16, more: bool) -> Vec<u8> {
    assert!(offset.is_multiple_of(8), "fragment offsets are in 8-octet units");
    let mut f = frame[..54].to_vec();
    let next = f[20];
    f[20] = 44;
    f.extend_from_slice(&[next, 0]);
    f.extend_from_slice(&(offset | u16::from(more)).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&frame[54..]);
    set_ip_length(&mut f, true);
    f
}

/// `frame` (IPv4) claiming an IP total length of `total` bytes, whatever it really carries (the
/// rest is link-layer padding to a receiver).
pub fn with_ipv4_total_length(frame: &[u8], total: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f
}

/// An IPv4 UDP datagram carrying `payload` (UDP checksum 0: none, which IPv4 allows).
pub fn udp4_with_payload(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = ip(src, dst, L4::Udp { sport, dport });
    assert!(src.is_ipv4(), "IPv6 UDP needs a checksum: not built here");
    f.extend_from_slice(payload);
    let udp_len = (8 + payload.len()) as u16;
    f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&udp_len.to_be_bytes());
    set_ip_length(&mut f, false);
    f
}

/// `frame` (IPv6) claiming a payload length of `len` bytes, whatever it really carries.
pub fn with_ipv6_payload_length(frame: &[u8], len: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[18..20].copy_from_slice(&len.to_be_bytes());
    f
}
