//! Micro-benchmarks of the cache-hit path and of UserSig work.
//!
//! Run: `cargo bench --bench hot_path`

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};

use chat_gateway::cache::assemble::Template;
use chat_gateway::cache::item_key::{self, Parsed};
use chat_gateway::cache::items::{ItemLookup, ItemStore, KeyBuf};
use chat_gateway::cache::key;
use chat_gateway::cache::store::{Lookup, Page, PageStore};
use chat_gateway::cache::PageCache;
use chat_gateway::chat::effects::EntityKind;
use chat_gateway::chat::reads;
use chat_gateway::chat::usersig;
use chat_gateway::config::Secret;
use chat_gateway::upstream::signer::Signer;

const BODY: &[u8] = br#"{"From_Account":"user_0042","TimeStamp":0,"StartIndex":0,"TopTimeStamp":0,"TopStartIndex":0,"AssistFlags":63}"#;

fn filled_store(accounts: usize) -> PageStore {
    let store = PageStore::new(1 << 30, 64);
    let page_body = Bytes::from(vec![b'x'; 2048]);
    for i in 0..accounts {
        let acc = format!("user_{i:04}");
        let body = format!(r#"{{"From_Account":"{acc}"}}"#);
        let req = key::parse(body.as_bytes()).unwrap();
        let now = Instant::now();
        let page = Page {
            key: req.page.clone(),
            body: page_body.clone(),
            stored_at: now,
            fresh_until: now + Duration::from_secs(3600),
            stale_until: now + Duration::from_secs(3900),
            groups: Box::new([]),
        };
        store.insert(&acc, page, store.begin_fetch());
    }
    store.stats();
    store
}

fn hit_path(c: &mut Criterion) {
    let store = filled_store(10_000);
    c.bench_function("get_list hit: parse + key + lookup", |b| {
        b.iter(|| {
            let req = key::parse(black_box(BODY)).unwrap();
            match store.lookup(&req.account, &req.page, Instant::now()) {
                Lookup::Fresh(p) => black_box(p.body.clone()),
                _ => panic!("expected a hit"),
            }
        })
    });
    c.bench_function("get_list parse only (fast scanner)", |b| {
        b.iter(|| black_box(key::parse(black_box(BODY)).unwrap().page.assist_flags))
    });
    c.bench_function("get_list parse only (general parser)", |b| {
        b.iter(|| {
            black_box(
                key::parse_general(black_box(BODY))
                    .unwrap()
                    .page
                    .assist_flags,
            )
        })
    });
}

/// A fully cached portrait_get of 20 accounts, as the handler serves it: parse and
/// key, 20 lookups (each checking its entry's dependencies), the answer assembled
/// from the template. Beside the get_list hit above, for the ratio.
fn item_hit_path(c: &mut Criterion) {
    let (row, r) = reads::row("profile/portrait_get").unwrap();
    let store = ItemStore::new(1 << 30);
    let accounts: Vec<String> = (0..10_000).map(|i| format!("user_{i:04}")).collect();
    let tags = r#"["Tag_Profile_IM_Nick","Tag_Profile_IM_Image"]"#;
    let variant = format!(r#","TagList":{tags}"#);
    let vid = store.variant_id(row, &variant);
    for a in &accounts {
        let item = format!(
            r#"{{"To_Account":"{a}","ResultCode":0,"ResultInfo":"","ProfileItem":[{{"Tag":"Tag_Profile_IM_Nick","Value":"nick of {a}"}},{{"Tag":"Tag_Profile_IM_Image","Value":"https://img.example/{a}.png"}}]}}"#
        );
        let e = store.entry(
            item.as_bytes(),
            store.begin_fetch(),
            store.deps([(EntityKind::Profile, a.as_str())]),
            Duration::from_secs(3600),
            Duration::from_secs(300),
        );
        store.insert(
            KeyBuf::new(row, vid, a).unwrap().to_key(),
            std::sync::Arc::new(e),
        );
    }
    let template = Template::of_row(r);
    let twenty: Vec<&str> = accounts
        .iter()
        .step_by(97)
        .take(20)
        .map(String::as_str)
        .collect();
    let body = format!(
        r#"{{"To_Account":{},"TagList":{tags}}}"#,
        serde_json::to_string(&twenty).unwrap()
    );
    c.bench_function(
        "portrait_get hit of 20: parse + keys + 20 lookups + assemble",
        |b| {
            b.iter(|| {
                let Parsed::Split(req) = item_key::parse(row, black_box(body.as_bytes())).unwrap()
                else {
                    panic!("splits")
                };
                let vid = store.variant_id(row, &req.variant);
                let now = Instant::now();
                let mut hits = Vec::with_capacity(req.items.len());
                for item in &req.items {
                    match store.lookup(&KeyBuf::new(row, vid, item).unwrap(), now) {
                        ItemLookup::Fresh(e) => hits.push(e),
                        _ => panic!("expected a hit"),
                    }
                }
                black_box(template.write(r, hits.iter().map(|e| (&e.body[..], None))))
            })
        },
    );
}

/// Adding a page to an account: a fresh account, and one already at the page cap
/// (64, the default), where the oldest page makes room: the copy-on-write is bounded.
fn page_insert(c: &mut Criterion) {
    let store = PageStore::new(1 << 30, 64);
    let body = Bytes::from(vec![b'x'; 1024]);
    let page = |ts: u64| {
        let now = Instant::now();
        Page {
            key: key::PageKey {
                time_stamp: ts,
                ..Default::default()
            },
            body: body.clone(),
            stored_at: now,
            fresh_until: now + Duration::from_secs(3600),
            stale_until: now + Duration::from_secs(3900),
            groups: Box::new([]),
        }
    };
    let mut n = 0u64;
    c.bench_function("insert a page: new account", |b| {
        b.iter(|| {
            n += 1;
            store.insert(&format!("new_{n}"), page(0), store.begin_fetch())
        })
    });
    for ts in 0..64 {
        store.insert("full", page(ts), store.begin_fetch());
    }
    let mut ts = 64;
    c.bench_function("insert a page: account at its 64-page cap", |b| {
        b.iter(|| {
            ts += 1;
            store.insert("full", page(ts), store.begin_fetch())
        })
    });
}

fn usersig_bench(c: &mut Criterion) {
    let key = b"5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";
    c.bench_function("usersig generate", |b| {
        b.iter(|| {
            usersig::generate(
                1400000000,
                key,
                black_box("administrator"),
                86400,
                1_700_000_000,
                None,
            )
        })
    });
    let sig = usersig::generate(1400000000, key, "administrator", 86400, 1_700_000_000, None);
    c.bench_function("usersig verify", |b| {
        b.iter(|| {
            usersig::verify(
                black_box(&sig),
                1400000000,
                key,
                "administrator",
                1_700_000_001,
            )
            .unwrap()
        })
    });
    let signer = Signer::new(
        1400000000,
        "administrator".into(),
        Secret::new("k"),
        Duration::from_secs(86400),
    );
    c.bench_function("signer cached usersig", |b| {
        b.iter(|| black_box(signer.usersig()))
    });
}

/// Invalidating one account while 1,000,000 pages are cached (100,000 accounts with 10
/// pages each): the cost must not depend on how much is cached.
fn invalidation(c: &mut Criterion) {
    let store = PageStore::new(u64::MAX / 2, 64);
    let body = Bytes::from_static(b"{}");
    let now = Instant::now();
    let page = |ts: u64| Page {
        key: key::PageKey {
            time_stamp: ts,
            ..Default::default()
        },
        body: body.clone(),
        stored_at: now,
        fresh_until: now + Duration::from_secs(3600),
        stale_until: now + Duration::from_secs(3900),
        groups: Box::new([]),
    };
    for a in 0..100_000u64 {
        let acc = format!("user_{a:06}");
        for ts in 0..10 {
            store.insert(&acc, page(ts), store.begin_fetch());
        }
    }
    let stats = store.stats();
    assert_eq!(stats.pages, 1_000_000);
    let mut n = 0u64;
    c.bench_function("invalidate one account of 1,000,000 cached pages", |b| {
        b.iter_batched(
            || {
                // Re-cache the account about to be dropped (not measured).
                n = (n + 7919) % 100_000;
                let acc = format!("user_{n:06}");
                for ts in 0..10 {
                    store.insert(&acc, page(ts), store.begin_fetch());
                }
                acc
            },
            |acc| assert_eq!(store.invalidate(&acc), 10),
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(
    benches,
    hit_path,
    item_hit_path,
    page_insert,
    usersig_bench,
    invalidation
);
criterion_main!(benches);
