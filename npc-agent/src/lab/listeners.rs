//! Listeners in a pod's namespace on its declared ports (TCP: accept, reply, close; UDP: echo),
//! and the client side of a probe.
use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    thread::JoinHandle,
    time::Duration,
};

use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, UdpSocket},
};
use tokio_util::sync::CancellationToken;

use npc_policy::model::{Pod, Protocol};

use super::{LabError, dns::Names, netns};

/// The listeners of one pod: one thread in the pod's namespace, serving every declared port on
/// a current-thread runtime until stopped (and joined) on drop.
pub(super) struct Listeners {
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Socket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

/// Binds every declared TCP and UDP port of `pod` inside namespace `ns` (IPv6 and IPv4 where the
/// namespace has IPv6, else IPv4) and serves them: TCP accepts, writes `ns/name` and closes; UDP
/// echoes, or with `dns` answers DNS queries on port 53 ([`super::dns`]). Fails, naming the port,
/// when one cannot be bound. SCTP ports are skipped (no SCTP sockets on these kernels; the
/// datapath tests cover it).
pub(super) fn start_listeners(ns: &str, pod: &Pod, dns: Option<Names>) -> Result<Listeners, LabError> {
    let stop = CancellationToken::new();
    let reply = format!("{}/{}\n", pod.namespace, pod.name).into_bytes();
    let ports: Vec<(u16, Protocol)> = pod
        .ports
        .iter()
        .map(|p| (p.port, p.protocol))
        .filter(|(_, protocol)| *protocol != Protocol::Sctp)
        .collect();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (ns, token, name) = (ns.to_string(), stop.clone(), pod.name.clone());
    let thread = std::thread::spawn(move || {
        let bind = || -> Result<Vec<Socket>, String> {
            netns::enter(&ns).map_err(|e| e.to_string())?;
            ports
                .iter()
                .map(|&(number, protocol)| {
                    let bound = match protocol {
                        Protocol::Tcp => std::net::TcpListener::bind(("::", number))
                            .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", number)))
                            .map(Socket::Tcp),
                        _ => std::net::UdpSocket::bind(("::", number))
                            .or_else(|_| std::net::UdpSocket::bind(("0.0.0.0", number)))
                            .map(Socket::Udp),
                    };
                    bound.map_err(|e| format!("listener {name}:{number}/{protocol}: {e}"))
                })
                .collect()
        };
        let sockets = match bind() {
            Ok(s) => s,
            Err(e) => return drop(ready_tx.send(Err(e))),
        };
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => return drop(ready_tx.send(Err(format!("listener runtime: {e}")))),
        };
        let _ = ready_tx.send(Ok(()));
        runtime.block_on(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for socket in sockets {
                tasks.spawn(serve(socket, reply.clone(), dns.clone()));
            }
            token.cancelled().await;
            tasks.abort_all();
        });
    });
    let started = ready_rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| Err(format!("the listeners of {} did not start", pod.name)));
    let listeners = Listeners {
        stop,
        thread: Some(thread),
    };
    started.map_err(LabError::Setup)?;
    Ok(listeners)
}

async fn serve(socket: Socket, reply: Vec<u8>, dns: Option<Names>) {
    match socket {
        Socket::Tcp(listener) => {
            let Ok(listener) = listener
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(listener))
            else {
                return;
            };
            let dns = dns.filter(|_| listener.local_addr().is_ok_and(|a| a.port() == 53));
            loop {
                // A failed accept (a connection reset before we took it) loses that one only.
                if let Ok((mut conn, _)) = listener.accept().await {
                    match &dns {
                        // DNS over TCP: a length-prefixed query first; a probe sends nothing.
                        Some(names) => {
                            let (names, reply) = (names.clone(), reply.clone());
                            tokio::spawn(async move {
                                let answer = tcp_dns_query(&mut conn, &names).await;
                                let _ = conn.write_all(answer.as_deref().unwrap_or(&reply)).await;
                            });
                        }
                        None => {
                            let _ = conn.write_all(&reply).await;
                        }
                    }
                }
            }
        }
        Socket::Udp(sock) => {
            let dns = dns.filter(|_| sock.local_addr().is_ok_and(|a| a.port() == 53));
            let Ok(sock) = sock.set_nonblocking(true).and_then(|()| UdpSocket::from_std(sock)) else {
                return;
            };
            let mut buf = [0u8; 512];
            loop {
                if let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                    let answer = dns.as_ref().and_then(|names| super::dns::answer(&buf[..n], names));
                    let _ = sock.send_to(answer.as_deref().unwrap_or(&buf[..n]), peer).await;
                }
            }
        }
    }
}

/// A DNS query over TCP (RFC 7766: two length bytes, then the message) answered, length-prefixed;
/// `None` when nothing that parses arrives within a moment (a lab probe, which only reads).
async fn tcp_dns_query(conn: &mut tokio::net::TcpStream, names: &Names) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let read = async {
        let len = conn.read_u16().await.ok()?;
        let mut query = vec![0u8; usize::from(len)];
        conn.read_exact(&mut query).await.ok()?;
        let answer = super::dns::answer(&query, names)?;
        let mut framed = u16::try_from(answer.len()).ok()?.to_be_bytes().to_vec();
        framed.extend(answer);
        Some(framed)
    };
    tokio::time::timeout(Duration::from_millis(300), read)
        .await
        .ok()
        .flatten()
}

/// Connects (TCP: and reads the reply; UDP: and waits for the echo) within `timeout`.
pub fn connect(addr: SocketAddr, protocol: Protocol, timeout: Duration) -> bool {
    match protocol {
        Protocol::Tcp => {
            let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
                return false;
            };
            let _ = stream.set_read_timeout(Some(timeout));
            let mut buf = [0u8; 256];
            matches!(stream.read(&mut buf), Ok(n) if n > 0)
        }
        Protocol::Udp => {
            let bind = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let Ok(sock) = std::net::UdpSocket::bind(bind) else {
                return false;
            };
            let _ = sock.set_read_timeout(Some(timeout));
            if sock.send_to(b"npc-probe", addr).is_err() {
                return false;
            }
            let mut buf = [0u8; 64];
            matches!(sock.recv_from(&mut buf), Ok((n, from)) if from == addr && &buf[..n] == b"npc-probe")
        }
        Protocol::Sctp => false,
    }
}
