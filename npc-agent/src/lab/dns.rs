//! The lab's cluster DNS: pods labelled `k8s-app=kube-dns` answer A queries for
//! `<svc>.<ns>.svc.cluster.local` with the Service's ClusterIP on their UDP 53 listener, as
//! CoreDNS's kubernetes plugin does; everything else gets NXDOMAIN. Non-DNS datagrams (the lab's
//! UDP probes) are still echoed, so probes and queries share the port. And the client side: a
//! query from inside a pod, as busybox's `wget http://name/` makes it.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    sync::{Arc, RwLock},
    time::Duration,
};

use simple_dns::{CLASS, Name, Packet, PacketFlag, QTYPE, Question, RCODE, ResourceRecord, TYPE, rdata::RData};

/// The cluster domain, as kubelet's `--cluster-domain` defaults it.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Name → ClusterIP, shared by the lab (which updates it on every apply) and its DNS pods.
pub type Names = Arc<RwLock<BTreeMap<String, Ipv4Addr>>>;

/// `<svc>.<ns>.svc.cluster.local`.
pub fn service_name(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}")
}

/// The reply to `query` when it is a DNS query; `None` when it is not one (echo it instead).
pub(super) fn answer(query: &[u8], names: &Names) -> Option<Vec<u8>> {
    let packet = Packet::parse(query).ok()?;
    if packet.has_flags(PacketFlag::RESPONSE) || packet.questions.is_empty() {
        return None;
    }
    let mut reply = Packet::new_reply(packet.id());
    reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
    if packet.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    let table = names.read().ok()?;
    let mut known = false;
    for q in &packet.questions {
        reply.questions.push(q.clone());
        let wanted = q.qname.to_string().trim_end_matches('.').to_ascii_lowercase();
        if let Some(addr) = table.get(&wanted) {
            known = true;
            if matches!(q.qtype, QTYPE::TYPE(TYPE::A)) {
                let rdata = RData::A(simple_dns::rdata::A::from(*addr));
                reply
                    .answers
                    .push(ResourceRecord::new(q.qname.clone(), CLASS::IN, 5, rdata));
            }
        }
    }
    if !known {
        *reply.rcode_mut() = RCODE::NameError;
    }
    reply.build_bytes_vec().ok()
}

/// What a lookup got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Address(IpAddr),
    /// NXDOMAIN (or an answer with no address).
    NoSuchName,
    /// Nothing came back within the timeout.
    NoReply,
}

/// How a lookup travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    /// RFC 7766: each message after two length bytes.
    Tcp,
}

/// Looks `name` up (an A query) at `server`, from the calling thread's namespace.
pub fn resolve(server: SocketAddr, name: &str, transport: Transport, timeout: Duration) -> Lookup {
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let mut query = Packet::new_query(id);
    query.set_flags(PacketFlag::RECURSION_DESIRED);
    let Ok(qname) = Name::new(name) else {
        return Lookup::NoSuchName;
    };
    query
        .questions
        .push(Question::new(qname, TYPE::A.into(), CLASS::IN.into(), false));
    let Ok(bytes) = query.build_bytes_vec() else {
        return Lookup::NoSuchName;
    };
    let reply = match transport {
        Transport::Udp => exchange_udp(server, &bytes, timeout),
        Transport::Tcp => exchange_tcp(server, &bytes, timeout),
    };
    let Some(reply) = reply else {
        return Lookup::NoReply;
    };
    let Some(reply) = Packet::parse(&reply).ok().filter(|r| r.id() == id) else {
        return Lookup::NoReply;
    };
    reply
        .answers
        .iter()
        .find_map(|rr| match &rr.rdata {
            RData::A(a) => Some(Lookup::Address(IpAddr::V4(Ipv4Addr::from(a.address)))),
            _ => None,
        })
        .unwrap_or(Lookup::NoSuchName)
}

fn exchange_udp(server: SocketAddr, query: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.set_read_timeout(Some(timeout)).ok()?;
    sock.send_to(query, server).ok()?;
    let mut buf = [0u8; 512];
    let (n, from) = sock.recv_from(&mut buf).ok()?;
    (from == server).then(|| buf[..n].to_vec())
}

fn exchange_tcp(server: SocketAddr, query: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    use std::io::{Read as _, Write as _};
    let mut conn = std::net::TcpStream::connect_timeout(&server, timeout).ok()?;
    conn.set_read_timeout(Some(timeout)).ok()?;
    let mut framed = u16::try_from(query.len()).ok()?.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    conn.write_all(&framed).ok()?;
    let mut len = [0u8; 2];
    conn.read_exact(&mut len).ok()?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut reply).ok()?;
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_service_names_and_nxdomain_otherwise_and_leaves_probes_alone() {
        let names: Names = Arc::default();
        names
            .write()
            .unwrap()
            .insert(service_name("ns-1", "http-echo"), Ipv4Addr::new(10, 96, 0, 7));
        let query = |id: u16, name: &str| {
            let mut q = Packet::new_query(id);
            let name = Name::new(name).unwrap();
            q.questions
                .push(Question::new(name, TYPE::A.into(), CLASS::IN.into(), false));
            q.build_bytes_vec().unwrap()
        };
        let reply = answer(&query(7, "http-echo.ns-1.svc.cluster.local"), &names).expect("a DNS reply");
        let reply = Packet::parse(&reply).unwrap();
        assert_eq!(reply.id(), 7);
        assert!(
            matches!(&reply.answers[0].rdata, RData::A(a) if Ipv4Addr::from(a.address) == Ipv4Addr::new(10, 96, 0, 7))
        );
        let nxdomain = answer(&query(8, "nope.ns-1.svc.cluster.local"), &names).unwrap();
        let reply = Packet::parse(&nxdomain).unwrap().rcode();
        assert_eq!(reply, RCODE::NameError);
        assert!(answer(b"npc-probe", &names).is_none(), "a probe is not DNS");
    }
}
