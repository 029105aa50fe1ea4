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
//! | `P:{rl:<command>}` | ZSET | the command's sliding-window log: one member per lease (`<count>\|<u>\|<nonce>`, scored by the lease's slot in Redis microseconds), `b\|<birth>` (score 0), `pause` (scored by the end of a pause), and per gateway its check-in (`r\|<id>`), its return from an incident (`m\|<id>\|…`) and its local share while Redis held writes (`l\|<id>\|<share>`), each scored by when it stops counting | members past the window (+ 1 s) removed on every lease; no expiry (so no `volatile-*` policy can evict it; under `allkeys-*` its loss is detected by the birth member) |
//! | `P:{a:<account>}:gen` | STRING | the generation of the account's conversation list (Redis ms of its last invalidation, or of its first lookup) | expires with the account's last page (`PX`, never extended by an invalidation) |
//! | `P:{a:<account>}:g:<Kind>`, `P:{g:<GroupId>}:g:<Kind>` | STRING | the generation of another entity (`Profile`, `Exists`, `Friends`, `JoinedGroups`; `GroupInfo`, `GroupMembers`), as above | expires with the last item entry that depends on it |
//! | `P:{a:<account>}:i:<fleet gen>:<gens>:<row>.<variant>` (or `{g:<GroupId>}`) | STRING | one item entry of a cached read: `<fresh until> <stale until> <stored>` (Redis ms) and the generations it carries from other slots, a newline, the item's bytes | `PX` = TTL + stale window, set by Redis when stored |
//! | `P:{a:<account>}:iix` (or `{g:<GroupId>}`) | ZSET | the item entries under that account or group, scored by expiry | at most `cache.max_pages_per_account` (the oldest goes); expires with the newest |
//! | `P:{a:<account>}:lk:i<row>.<variant>` (or `{g:<GroupId>}`) | STRING | the token of the gateway fetching that item | `PX` = `chat.request_timeout_ms` + 1 s |
//! | `P:{a:<account>}:p:<fleet gen>:<gen>:<page>` | STRING | one page: `<fresh until> <stale until> <stored>` (Redis ms), a newline, Chat's bytes | `PX` = TTL + stale window, set by Redis when stored |
//! | `P:{a:<account>}:ix` | ZSET | the account's page keys, scored by expiry | at most `cache.max_pages_per_account` (the oldest page goes); expires with the newest page |
//! | `P:{a:<account>}:lk:<page>` | STRING | the token of the gateway fetching that page | `PX` = `chat.request_timeout_ms` + 1 s |
//! | `P:{g:<GroupId>}:ix` | ZSET | accounts whose L2 pages list the group, scored by when they were indexed (Redis ms), and the member `~` (scored +inf) that marks the set as alive | members leave when a group event has bumped them; the key expires with the last page that put an account in it |
//! | `P:{fleet}:bus` | STREAM | invalidation events, each with its number `n` | `MAXLEN ~` [`super::bus::MAXLEN`] |
//! | `P:{fleet}:seq` | STRING | the number of the last event | one integer |
//! | `P:{fleet}:hb` | ZSET | gateway id → its last heartbeat (Redis ms) | members older than [`super::heartbeat::LIVE`] removed each beat; expires when no gateway beats |
//! | `P:{fleet}:ack` | ZSET | gateway id → the number of the last event it applied | members of gateways no longer beating removed (a few per beat, and on leaving) |
//! | `P:{fleet}:gen` | STRING | the fleet-wide generation (part of every page's name) | one integer; only ever raised, past every value a gateway has seen |
//! | `P:{fleet}:groups` | ZSET | GroupId → when its index set expires (Redis ms): a set missing before then was evicted | entries past their time removed (a few per store) |
//! | `P:{fleet}:gev` | ZSET | GroupId → its last group event (Redis ms): a page fetched before it is not stored | entries older than [`super::l2::EVENT_MEMORY`] removed (a few per event) |
//!
//! The `{fleet}` keys have no expiry: a `volatile-*` `maxmemory-policy` never evicts
//! them, and their loss under any other is detected (see [`super::heartbeat`] and
//! [`super::bus`]).

use crate::cache::key::PageKey;
use crate::chat::effects::EntityKind;
use sha2::{Digest, Sha256};

/// The hash tag of an entity's slot: its account's (`a:<UserID>`) or its group's
/// (`g:<GroupId>`). Every key of one account, or of one group, shares it.
pub fn tag(kind: EntityKind, id: &str) -> String {
    if kind.of_account() {
        format!("a:{id}")
    } else {
        format!("g:{id}")
    }
}

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

    /// An account's generation.
    pub fn account_gen(&self, account: &str) -> String {
        format!("{}:{{a:{account}}}:gen", self.base)
    }

    /// The generation of an entity: an account's conversation list is its pages'
    /// generation ([`Keys::account_gen`]); any other entity has its own key in its
    /// account's or group's slot.
    pub fn entity_gen(&self, kind: EntityKind, id: &str) -> String {
        match kind {
            EntityKind::Conversations => self.account_gen(id),
            k => format!("{}:{{{}}}:g:{}", self.base, tag(k, id), k.as_str()),
        }
    }

    /// The prefix of the item entries in the slot `tag` (`<prefix><fleet
    /// gen>:<gens>:<name>`).
    pub fn item_prefix(&self, tag: &str) -> String {
        format!("{}:{{{tag}}}:i:", self.base)
    }

    /// The index of the item entries in the slot `tag`.
    pub fn item_index(&self, tag: &str) -> String {
        format!("{}:{{{tag}}}:iix", self.base)
    }

    /// The fetch lock of the item entry `name` in the slot `tag`.
    pub fn item_lock(&self, tag: &str, name: &str) -> String {
        format!("{}:{{{tag}}}:lk:i{name}", self.base)
    }

    /// The positions of the stream each gateway has applied.
    pub fn acks(&self) -> String {
        format!("{}:{{fleet}}:ack", self.base)
    }

    /// The prefix of an account's page keys (`<prefix><fleet gen>:<gen>:<page>`).
    pub fn page_prefix(&self, account: &str) -> String {
        format!("{}:{{a:{account}}}:p:", self.base)
    }

    /// An account's index of its page keys.
    pub fn page_index(&self, account: &str) -> String {
        format!("{}:{{a:{account}}}:ix", self.base)
    }

    /// The fetch lock of one page of an account.
    pub fn lock(&self, account: &str, page: &str) -> String {
        format!("{}:{{a:{account}}}:lk:{page}", self.base)
    }

    /// The accounts whose L2 pages list `group`.
    pub fn group(&self, group: &str) -> String {
        format!("{}:{{g:{group}}}:ix", self.base)
    }

    /// Group index sets and when they expire.
    pub fn group_registry(&self) -> String {
        format!("{}:{{fleet}}:groups", self.base)
    }

    /// Groups and their last event.
    pub fn group_events(&self) -> String {
        format!("{}:{{fleet}}:gev", self.base)
    }

    /// The number of the last event.
    pub fn bus_seq(&self) -> String {
        format!("{}:{{fleet}}:seq", self.base)
    }

    /// What gateway `id` last appended to the stream ("ticket n entry-id"): a batch
    /// sent again after its answer was lost is not appended twice.
    pub fn bus_sent(&self, id: &str) -> String {
        format!("{}:{{fleet}}:sent:{id}", self.base)
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

    /// The generation of every conversation page.
    pub fn pages_gen(&self) -> String {
        format!("{}:{{fleet}}:pgen", self.base)
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
        let a = k.account_gen("alice");
        assert_eq!(a, "chat-gateway:1400000000:{a:alice}:gen");
        assert_eq!(tag(&a), tag(&k.lock("alice", "0.0.0.0.63")));
        assert_eq!(tag(&a), tag(&k.page_index("alice")));
        assert_eq!(tag(&a), tag(&format!("{}x", k.page_prefix("alice"))));
        assert_eq!(tag(&a), tag(&k.entity_gen(EntityKind::Profile, "alice")));
        assert_eq!(a, k.entity_gen(EntityKind::Conversations, "alice"));
        let t = super::tag(EntityKind::Friends, "alice");
        assert_eq!(tag(&a), tag(&k.item_prefix(&t)));
        assert_eq!(tag(&a), tag(&k.item_index(&t)));
        assert_eq!(tag(&a), tag(&k.item_lock(&t, "0.ff")));
        assert_eq!(
            tag(&k.group("@g")),
            tag(&k.entity_gen(EntityKind::GroupMembers, "@g"))
        );
        assert_eq!(
            tag(&k.group("@g")),
            tag(&k.item_index(&super::tag(EntityKind::GroupInfo, "@g")))
        );
        for fleet in [
            k.acks(),
            k.heartbeat(),
            k.fleet_gen(),
            k.pages_gen(),
            k.bus_seq(),
            k.group_registry(),
            k.group_events(),
        ] {
            assert_eq!(tag(&k.bus()), tag(&fleet));
        }
        assert_eq!(tag(&k.group("@TGS#1")), "g:@TGS#1");
        assert_eq!(tag(&k.limiter("openim/sendmsg")), "rl:openim/sendmsg");
        assert_eq!(page_name(&PageKey::default()), "0.0.0.0.63");
        let extra = PageKey {
            extra: Some("{\"x\":1}".into()),
            ..PageKey::default()
        };
        assert_eq!(page_name(&extra).len(), "0.0.0.0.63.".len() + 32);
    }
}
