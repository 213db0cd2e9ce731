//! `--flows-out`: each worker lists the flows of its allocations that are set up, once, as
//! setup settles (before it says so), for the main thread to write.

use super::*;
use crate::flows::Flow;

impl Worker {
    /// Stores this worker's flows in its [`Progress::flows`].
    pub(super) fn export_flows(&self) {
        let k = self.plan.per_alloc;
        let mut out = Vec::with_capacity(self.allocs.len() * k);
        for (a, al) in self.allocs.iter().enumerate() {
            if !matches!(al.st, St::Ready | St::Refresh) {
                continue;
            }
            let Some(client) = al
                .sock
                .as_ref()
                .and_then(|s| s.local_addr().ok())
                .and_then(|addr| addr.as_socket_ipv4())
            else {
                continue;
            };
            let relayed = match self.plan.mode {
                Mode::Turn => match al.relayed_addr {
                    Some(r) => r,
                    None => continue,
                },
                Mode::Raw => self.plan.server,
            };
            for j in 0..k {
                out.push(Flow {
                    client,
                    channel: (self.plan.mode == Mode::Turn).then_some(channel_data::MIN_CHANNEL + j as u16),
                    index: self.global_chan(a, j),
                    peer: self.peer_of(a, j),
                    relayed,
                });
            }
        }
        let mut slot = self.shared.progress[self.id]
            .flows
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *slot = out;
    }
}
