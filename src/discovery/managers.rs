//! Finding push-managers: each running manager keeps `/services/push-manager/<manager_id>`
//! = its advertised `host:port` on a lease ([`super::register`]), so a client reads that
//! prefix and spreads its broadcasts over what it finds (`push-manager send --etcd`, and
//! [`crate::client::ManagerPool`] for Rust callers).

use super::value::{self, Registered};
use super::{DiscoveryError, EtcdSettings};

/// The prefix managers register under (CONTRACT.md section 3).
pub const MANAGER_PREFIX: &str = "/services/push-manager/";

/// One registered push-manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerEndpoint {
    /// The manager's id (the key's suffix).
    pub manager_id: String,
    /// Its advertised `host:port`.
    pub addr: String,
}

/// The key manager `manager_id` registers under.
pub fn manager_key(manager_id: &str) -> String {
    format!("{MANAGER_PREFIX}{manager_id}")
}

/// Every push-manager registered in etcd now, in manager id order. A key whose value is
/// not a usable address is skipped with a warning. An empty list is not an error.
pub async fn resolve_managers(
    settings: &EtcdSettings,
) -> Result<Vec<ManagerEndpoint>, DiscoveryError> {
    let mut client = settings.connect().await?;
    let resp = client
        .get(
            MANAGER_PREFIX,
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    let mut out = Vec::new();
    for kv in resp.kvs() {
        let key = value::show_key(kv.key());
        let parsed = value::node_id(MANAGER_PREFIX, kv.key())
            .and_then(|id| value::parse(kv.value()).map(|v| (id, v)));
        match parsed {
            Ok((id, Registered::At(addr))) => out.push(ManagerEndpoint {
                manager_id: id.to_string(),
                addr,
            }),
            Ok((_, Registered::Gone)) => {}
            Err(reason) => {
                tracing::warn!(%key, %reason, "skipping an unusable manager registration")
            }
        }
    }
    Ok(out)
}
