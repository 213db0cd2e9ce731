//! The flows loadgen set up, written after setup with `--flows-out FILE` (JSON) so that
//! another sender can drive them: `xdp-gen` (feature `xdp`) builds one client frame and one
//! peer frame per flow from this list while loadgen holds the allocations open (`--hold`).

use std::net::SocketAddrV4;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One channel (TURN) or route (bare forwarder): client → server → peer and back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// The client's transport address (its socket's local address).
    pub client: SocketAddrV4,
    /// The channel number bound to `peer` on the client's allocation (TURN); `None` for the
    /// bare forwarder, which routes on `index`.
    pub channel: Option<u16>,
    /// loadgen's global channel index: the first four bytes of every payload (little-endian),
    /// the bare forwarder's route.
    pub index: u32,
    /// The echo peer's address.
    pub peer: SocketAddrV4,
    /// Where the peer sends to reach the client: the allocation's relayed transport address
    /// (TURN), or the bare forwarder's own address.
    pub relayed: SocketAddrV4,
}

/// Every flow of a run, and what they have in common.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowList {
    /// `turn` or `raw`.
    pub mode: String,
    /// The server (or bare forwarder) the clients send to.
    pub server: SocketAddrV4,
    /// loadgen's `--size`: payload bytes.
    pub size: usize,
    /// The flows of the allocations that were set up, in global channel order.
    pub flows: Vec<Flow>,
}

impl FlowList {
    /// Writes the list as JSON to `path` (through a temporary file and a rename, so that a
    /// reader polling for `path` never sees half of it).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }

    /// Reads a list written by [`FlowList::write`].
    ///
    /// # Errors
    /// Unreadable file or malformed JSON.
    pub fn read(path: &Path) -> Result<FlowList> {
        let b = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let list = FlowList {
            mode: "raw".into(),
            server: "127.0.0.1:3479".parse().unwrap(),
            size: 100,
            flows: vec![Flow {
                client: "127.0.0.1:40000".parse().unwrap(),
                channel: None,
                index: 3,
                peer: "127.2.0.1:50000".parse().unwrap(),
                relayed: "127.0.0.1:3479".parse().unwrap(),
            }],
        };
        let dir = std::env::temp_dir().join(format!("loadgen-flows-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("flows.json");
        list.write(&p).unwrap();
        assert_eq!(FlowList::read(&p).unwrap(), list);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
