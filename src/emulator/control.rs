//! The control endpoints under `/__emulator/`: plain JSON, no UserSig, never subject
//! to faults.
//!
//! | endpoint | what it does |
//! | --- | --- |
//! | `GET /__emulator/health` | `{"status":"ok"}` once serving |
//! | `GET /__emulator/stats` | counters (calls per command and account, faults, 60007s) |
//! | `POST /__emulator/reset-stats` | zeroes the counters |
//! | `GET /__emulator/faults` | fault settings in force |
//! | `POST /__emulator/faults` | changes any subset of them (JSON object) |
//! | `GET /__emulator/admin-usersig` | a fresh UserSig (`?identifier=&expire=&format=text`) |
//! | `GET /__emulator/world` | the world's shape: sizes, seed, epoch, page sizes |
//! | `GET /__emulator/accounts/<name>` | one account's whole list, marks and groups |
//! | `GET /__emulator/groups?id=<GroupId>` | a group's members (all groups without `id`) |
//! | `POST /__emulator/client/<service>/<command>?as=<UserID>` | a change made from a user's app (`client`) |
//! | `GET /__emulator/webhooks?since=<n>` | the webhooks the changes produced (numbered) |
//! | `GET`/`POST /__emulator/callback` | the callback URL in force / change it at run time |

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::auth::{parse_params_any, percent_decode};
use super::faults::FaultUpdate;
use super::paging;
use super::state::{read_body, respond, unix_now, State};
use super::world::{is_heavy, read};

/// Largest control request body.
const MAX_CONTROL_BODY: usize = 64 * 1024;
/// Longest lifetime `admin-usersig` hands out: 10 years.
const MAX_EXPIRE: u64 = 10 * 365 * 86_400;

fn json_reply(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", Bytes::from(v.to_string()))
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response<Full<Bytes>> {
    json_reply(status, &json!({"error": msg.into()}))
}

/// Serves one control request.
pub(crate) async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req
        .uri()
        .path()
        .trim_start_matches("/__emulator")
        .trim_start_matches('/')
        .to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::GET, "health") => json_reply(StatusCode::OK, &json!({"status": "ok"})),
        (Method::GET, "stats") => {
            let mut report = state.stats.report(&state.world);
            if let Some(obj) = report.as_object_mut() {
                obj.insert("faults".into(), json!(state.faults.get()));
            }
            json_reply(StatusCode::OK, &report)
        }
        (Method::POST, "reset-stats") => {
            state.stats.reset();
            json_reply(StatusCode::OK, &json!({"reset": true}))
        }
        (Method::GET, "faults") => json_reply(StatusCode::OK, &json!(state.faults.get())),
        (Method::POST, "faults") => {
            let body = match read_body(req, MAX_CONTROL_BODY).await {
                Ok(b) => b,
                Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, e.info),
            };
            let update: FaultUpdate = match serde_json::from_slice(&body) {
                Ok(u) => u,
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid faults JSON: {e}")),
            };
            match state.faults.update(&update) {
                Ok(s) => {
                    tracing::info!(faults = ?s, "fault settings changed");
                    json_reply(StatusCode::OK, &json!(s))
                }
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            }
        }
        (Method::GET, "admin-usersig") => admin_usersig(state, &query),
        (Method::GET, "world") => world(state),
        (Method::GET, "groups") => groups(state, &query),
        (Method::GET, "webhooks") => webhooks(state, &query),
        (Method::GET, "callback") => callback_reply(state),
        (Method::POST, "callback") => {
            let body = match read_body(req, MAX_CONTROL_BODY).await {
                Ok(b) => b,
                Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, e.info),
            };
            let update: CallbackUpdate = match serde_json::from_slice(&body) {
                Ok(u) => u,
                Err(e) => {
                    return error(StatusCode::BAD_REQUEST, format!("invalid callback JSON: {e}"))
                }
            };
            match state.set_callback(update.url.as_deref(), update.token) {
                Ok(()) => {
                    tracing::info!(url = ?update.url, "webhook callback URL changed");
                    callback_reply(state)
                }
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            }
        }
        (Method::GET, p) if p.starts_with("accounts/") => account(state, &p["accounts/".len()..]),
        (Method::POST, p) if p.starts_with("client/") => {
            super::client::handle(state, &p["client/".len()..], &query, req).await
        }
        (
            _,
            "health" | "stats" | "reset-stats" | "faults" | "admin-usersig" | "world" | "groups"
            | "webhooks" | "callback",
        ) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "unknown control endpoint; see /__emulator/health, stats, reset-stats, faults, admin-usersig, world, accounts/<name>, groups, webhooks, callback, client/<service>/<command>",
        ),
    }
}

fn admin_usersig(state: &State, query: &str) -> Response<Full<Bytes>> {
    let params = parse_params_any(query);
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let identifier = get("identifier")
        .filter(|s| !s.is_empty())
        .unwrap_or(&state.cfg.identifier)
        .to_owned();
    let expire = match get("expire").map(str::parse::<u64>) {
        None => 86_400,
        Some(Ok(e)) if (1..=MAX_EXPIRE).contains(&e) => e,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expire must be 1 to {MAX_EXPIRE} seconds"),
            )
        }
    };
    let now = unix_now();
    let sig = state.auth.mint(&identifier, expire, now);
    if get("format") == Some("text") {
        return respond(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            Bytes::from(sig),
        );
    }
    json_reply(
        StatusCode::OK,
        &json!({
            "UserSig": sig,
            "Identifier": identifier,
            "SdkAppId": state.cfg.sdkappid,
            "Expire": expire,
            "ExpireAt": now + expire,
        }),
    )
}

fn world(state: &State) -> Response<Full<Bytes>> {
    let w = &state.world;
    let n = w.account_count();
    let heavy: Vec<&str> = (0..n)
        .filter(|&i| is_heavy(i))
        .take(10)
        .map(|i| w.name(i))
        .collect();
    json_reply(
        StatusCode::OK,
        &json!({
            "sdkappid": state.cfg.sdkappid,
            "identifier": state.cfg.identifier,
            "seed": w.seed(),
            "epoch": w.epoch(),
            "accounts": n,
            "first_account": w.name(0),
            "last_account": w.name(n.saturating_sub(1)),
            "name_width": w.name_width(),
            "groups": read(w.groups()).live().count(),
            "generated_groups": w.generated_groups(),
            "imported_accounts": w.imported_count(),
            "friendships": w.friendship_count(),
            "conversations": w.conversation_count(),
            "heavy_accounts": heavy,
            "page_size": state.cfg.page_size,
            "top_page_size": state.cfg.top_page_size,
        }),
    )
}

fn account(state: &State, name: &str) -> Response<Full<Bytes>> {
    let name = percent_decode(name);
    let Some(lock) = state
        .world
        .account_index(&name)
        .and_then(|i| state.world.account(i))
    else {
        return error(StatusCode::NOT_FOUND, format!("no account {name:?}"));
    };
    let acct = read(lock);
    let marks: Vec<Value> = acct
        .marks
        .iter()
        .map(|(&peer, m)| {
            json!({
                "Peer": state.world.peer_id(peer),
                "StandardMark": m.standard_string().unwrap_or_default(),
                "CustomMark": m.custom,
                "ContactGroupId": m.groups,
                "Timestamp": m.timestamp,
            })
        })
        .collect();
    let groups: Vec<Value> = acct
        .contact_groups
        .iter()
        .map(|g| json!({"GroupName": g.name, "GroupId": g.id}))
        .collect();
    json_reply(
        StatusCode::OK,
        &json!({
            "Account": &*name,
            "Imported": acct.imported,
            "SessionItem": paging::dump(&state.world, &acct),
            "Marks": marks,
            "GroupItem": groups,
        }),
    )
}

fn groups(state: &State, query: &str) -> Response<Full<Bytes>> {
    let params = parse_params_any(query);
    let w = &state.world;
    let table = read(w.groups());
    match params.iter().find(|(k, _)| k == "id") {
        Some((_, id)) => match w.group_index(id).and_then(|g| table.get(g)) {
            Some(d) => {
                let members: Vec<&str> =
                    d.sorted_members().into_iter().map(|m| w.name(m)).collect();
                json_reply(
                    StatusCode::OK,
                    &json!({
                        "GroupId": id,
                        "Type": d.kind.as_str(),
                        "Owner_Account": d.owner.map_or("", |o| w.name(o)),
                        "MemberNum": d.members.len(),
                        "Members": members,
                    }),
                )
            }
            None => error(StatusCode::NOT_FOUND, format!("no group {id:?}")),
        },
        None => {
            let all: Vec<Value> = table
                .live()
                .map(|(g, d)| json!({"GroupId": w.group_id(g), "MemberCount": d.members.len()}))
                .collect();
            json_reply(StatusCode::OK, &json!({"Groups": all}))
        }
    }
}

fn webhooks(state: &State, query: &str) -> Response<Full<Bytes>> {
    let params = parse_params_any(query);
    let since = match params.iter().find(|(k, _)| k == "since") {
        None => 0,
        Some((_, v)) => match v.parse::<u64>() {
            Ok(n) => n,
            Err(_) => return error(StatusCode::BAD_REQUEST, "since must be a number"),
        },
    };
    let (list, last) = state
        .hook_log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .since(since);
    json_reply(StatusCode::OK, &json!({"Last": last, "Webhooks": list}))
}

/// `POST /__emulator/callback`: `{"url": "http://..." | null, "token": "..."}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CallbackUpdate {
    url: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

fn callback_reply(state: &State) -> Response<Full<Bytes>> {
    let (url, signed) = state.callback();
    json_reply(StatusCode::OK, &json!({"url": url, "signed": signed}))
}
