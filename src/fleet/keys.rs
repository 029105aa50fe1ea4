//! Every Redis key the fleet uses, in one place.
//!
//! All keys start with `<redis.key_prefix>:<chat.sdkappid>:`, so gateways sharing the
//! URL, the prefix and the SDKAppID form one fleet and nothing else collides. The part
//! in braces is the Redis Cluster hash tag: every key of one account lives on one slot
//! (so the L2 scripts, which touch an account's pages, generation and locks together,
//! run on one node), each command's limiter log is one key, and the three fleet-wide
//! keys share the `{fleet}` slot.
//!
//! | key | type | holds | bounded by |
//! | --- | --- | --- | --- |
//! | `P:{rl:<command>}` | ZSET | the command's sliding-window log: one member per lease (`<count>\|<nonce>`, scored by the lease's slot in Redis microseconds) and `pause` (scored by the end of a pause) | entries older than the window are removed on every lease; the key expires one window after its newest slot |
//! | `P:{a:<account>}` | HASH | `gen` (the account's generation) and its pages, `p:<fleet gen>:<gen>:<page>` → page | pages of other generations are pruned on store; the key expires with its last page (TTL + stale window) |
//! | `P:{a:<account>}:lk:<page>` | STRING | the token of the gateway fetching that page | `PX` = `chat.request_timeout_ms` + 1 s |
//! | `P:{g:<GroupId>}` | SET | accounts whose L2 pages list the group | expires with the pages that put them there |
//! | `P:{fleet}:bus` | STREAM | invalidation events | `MAXLEN ~` [`super::bus::MAXLEN`] |
//! | `P:{fleet}:hb` | ZSET | gateway id → its last heartbeat (Redis ms) | members older than [`super::heartbeat::LIVE`] removed each beat; expires when no gateway beats |
//! | `P:{fleet}:gen` | STRING | the fleet-wide generation (bumped by "invalidate everything") | one integer; never decreases, even across a Redis restart |

use crate::cache::key::PageKey;
use sha2::{Digest, Sha256};

/// The fleet's key names.
#[derive(Debug, Clone)]
pub struct Keys {
    /// `<prefix>:<sdkappid>`
    base: String,
}

impl Keys {
    /// Keys of the fleet `prefix` for app `sdkappid`.
    pub fn new(prefix: &str, sdkappid: u64) -> Self {
        Keys {
            base: format!("{prefix}:{sdkappid}"),
        }
    }

    /// A command's limiter log.
    pub fn limiter(&self, command: &str) -> String {
        format!("{}:{{rl:{command}}}", self.base)
    }

    /// An account's generation and pages.
    pub fn account(&self, account: &str) -> String {
        format!("{}:{{a:{account}}}", self.base)
    }

    /// The fetch lock of one page of an account.
    pub fn lock(&self, account: &str, page: &str) -> String {
        format!("{}:{{a:{account}}}:lk:{page}", self.base)
    }

    /// The accounts whose L2 pages list `group`.
    pub fn group(&self, group: &str) -> String {
        format!("{}:{{g:{group}}}", self.base)
    }

    /// The invalidation stream.
    pub fn bus(&self) -> String {
        format!("{}:{{fleet}}:bus", self.base)
    }

    /// The heartbeats.
    pub fn heartbeat(&self) -> String {
        format!("{}:{{fleet}}:hb", self.base)
    }

    /// The fleet-wide generation.
    pub fn fleet_gen(&self) -> String {
        format!("{}:{{fleet}}:gen", self.base)
    }
}

/// A page's name within its account: the cursors and flags in clear, plus a digest of
/// the extra fields when there are any.
pub fn page_name(key: &PageKey) -> String {
    let mut s = format!(
        "{}.{}.{}.{}.{}",
        key.time_stamp, key.start_index, key.top_time_stamp, key.top_start_index, key.assist_flags
    );
    if let Some(extra) = &key.extra {
        let d = Sha256::digest(extra.as_bytes());
        s.push('.');
        s.push_str(&hex::encode(&d[..16]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash tag Redis Cluster slots a key by.
    fn tag(key: &str) -> &str {
        let open = key.find('{').unwrap();
        let close = open + key[open..].find('}').unwrap();
        &key[open + 1..close]
    }

    #[test]
    fn every_key_of_an_account_shares_a_slot() {
        let k = Keys::new("chat-gateway", 1400000000);
        let a = k.account("alice");
        assert_eq!(a, "chat-gateway:1400000000:{a:alice}");
        assert_eq!(tag(&a), tag(&k.lock("alice", "0.0.0.0.63")));
        assert_eq!(tag(&k.bus()), tag(&k.heartbeat()));
        assert_eq!(tag(&k.bus()), tag(&k.fleet_gen()));
        assert_eq!(tag(&k.limiter("openim/sendmsg")), "rl:openim/sendmsg");
        assert_eq!(page_name(&PageKey::default()), "0.0.0.0.63");
        let extra = PageKey {
            extra: Some("{\"x\":1}".into()),
            ..PageKey::default()
        };
        assert_eq!(page_name(&extra).len(), "0.0.0.0.63.".len() + 32);
    }
}
