//! The datapath's own log lines (aya-log), pumped into tracing.
use std::thread::JoinHandle;

use aya::Ebpf;
use tokio::io::{Interest, unix::AsyncFd};
use tokio_util::sync::CancellationToken;

/// Keeps aya-log's reader alive and drained on a thread of its own (dropping the logger closes
/// the log map, and the programs then fail to load: "fd N is not pointing to valid bpf_map").
/// The thread waits on the log ring buffer's fd with tokio's `AsyncFd`: it wakes on data or on
/// stop, never on a timer.
pub(super) struct LogPump {
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl LogPump {
    pub(super) fn start(ebpf: &mut Ebpf) -> Option<Self> {
        let logger = match aya_log::EbpfLogger::init(ebpf) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("datapath logging unavailable: {e}");
                return None;
            }
        };
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::Builder::new()
            .name("npc-ebpf-log".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_io().build() else {
                    return tracing::warn!("datapath logging unavailable: no runtime");
                };
                runtime.block_on(async move {
                    // SAFETY: the logger owns its ring buffer's fd and keeps it open, unchanged,
                    // until it is dropped, and the AsyncFd owns the logger.
                    let mut logger = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
                        Ok(fd) => fd,
                        Err(e) => return tracing::warn!("datapath logging unavailable: {}", std::io::Error::from(e)),
                    };
                    loop {
                        tokio::select! {
                            () = token.cancelled() => return,
                            ready = logger.readable_mut() => {
                                let Ok(mut guard) = ready else { return };
                                guard.get_inner_mut().flush();
                                guard.clear_ready();
                            }
                        }
                    }
                });
            })
            .ok()?;
        Some(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for LogPump {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
