//! The subcommands, one function each. `main.rs` only parses and dispatches.

use std::path::Path;
use std::process::ExitCode;

use crate::cli::UsersigArgs;
use crate::config::{self, LogFormat, Settings};
use crate::server::{self, AppState};
use crate::telemetry;

/// How to give the gateway a configuration, printed when it has none.
const NO_CONFIG_HINT: &str = "\
chat-gateway needs a configuration: give a file with --config FILE (or
CHAT_GATEWAY_CONFIG=FILE; config/*.example.toml are starting points and
config/default.toml documents every key), or set the keys as environment
variables CHAT_GATEWAY__<SECTION>__<KEY> (e.g. CHAT_GATEWAY__CHAT__SDKAPPID).
To try it with no Tencent account: `chat-gateway demo`.";

/// Loads the config or prints why not (with how to give one, when none was given).
fn load(path: Option<&Path>) -> Result<Settings, ExitCode> {
    config::load(path).map_err(|e| {
        eprintln!("chat-gateway: {e}");
        let env_given = std::env::vars().any(|(k, _)| k.starts_with("CHAT_GATEWAY__"));
        if path.is_none() && !env_given {
            eprintln!("{NO_CONFIG_HINT}");
        }
        ExitCode::from(1)
    })
}

/// Raises the soft open-files limit to the hard limit: every connection is a file
/// descriptor, and the default soft limit (often 1024) is below `server.max_connections`.
pub fn raise_fd_limit() {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// `chat-gateway [serve]`: serves until SIGTERM/SIGINT or `/quitquitquit`.
pub fn serve(config_path: Option<&Path>) -> ExitCode {
    raise_fd_limit();
    let settings = match load(config_path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    telemetry::init_for(&settings);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat-gateway: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let listeners = match server::Listeners::bind(&settings.server) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("chat-gateway: {e}");
                return ExitCode::from(1);
            }
        };
        if let Err(e) = telemetry::start_tracing(&settings) {
            tracing::error!(error = %e, "cannot start");
            eprintln!("chat-gateway: {e}");
            return ExitCode::from(1);
        }
        let secret_files = config::secrets::files(&settings);
        let state = match AppState::new(settings) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("chat-gateway: {e}");
                return ExitCode::from(1);
            }
        };
        let fleet = state.fleet.clone();
        if let Some(f) = &fleet {
            // Start in fleet mode when Redis answers at once; one that does not delays
            // serving by at most this (the gateway then serves alone until it answers).
            f.wait_ready(std::time::Duration::from_secs(2)).await;
        }
        let _watcher = config::reload::Reloader::new(
            config_path.map(Path::to_path_buf),
            state.settings.clone(),
            state.live.clone(),
        )
        .spawn();
        let _secrets_watcher = config::secrets::watch(state.secrets.clone(), secret_files);
        let addr = |l: Option<&tokio::net::TcpListener>| {
            l.and_then(|l| l.local_addr().ok())
                .map_or_else(|| "-".to_string(), |a| a.to_string())
        };
        tracing::info!(
            listen = %addr(Some(&listeners.main)),
            admin = %addr(listeners.admin.as_ref()),
            callback = %addr(listeners.callback.as_ref()),
            upstream = %state.settings.chat.base_url,
            "chat-gateway serving"
        );
        server::listener::sd_notify("READY=1");
        let drained = server::run(listeners, state, server::listener::termination_signal()).await;
        if let Some(f) = &fleet {
            f.leave(std::time::Duration::from_secs(1)).await;
        }
        tracing::info!(drained, "chat-gateway stopped");
        telemetry::flush(std::time::Duration::from_secs(2)).await;
        ExitCode::SUCCESS
    })
}

/// `chat-gateway check-config`: validates and prints the effective config, secrets
/// redacted.
pub fn check_config(config_path: Option<&Path>) -> ExitCode {
    match load(config_path) {
        Ok(s) => {
            print!("{}", s.to_toml());
            eprintln!("config OK");
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `chat-gateway usersig`: prints a UserSig made with the configured key.
pub fn usersig(config_path: Option<&Path>, args: &UsersigArgs) -> ExitCode {
    let settings = match load(config_path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let c = &settings.chat;
    let identifier = args.identifier.as_deref().unwrap_or(&c.identifier);
    if let Err(why) = config::settings::validate_identifier(identifier) {
        eprintln!("chat-gateway usersig: --identifier {why}");
        return ExitCode::from(2);
    }
    let expire = args.expire.unwrap_or(c.usersig_ttl.as_secs());
    let sig = crate::chat::usersig::generate(
        c.sdkappid,
        c.secret_key.expose().as_bytes(),
        identifier,
        expire,
        crate::upstream::signer::unix_now(),
        None,
    );
    println!("{sig}");
    ExitCode::SUCCESS
}

/// Log set-up for the commands that run without a gateway config.
pub fn init_default_logging() {
    telemetry::init(LogFormat::Text, "info");
}

/// A multi-threaded runtime, or a message and exit code 1.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("chat-gateway: cannot start the runtime: {e}");
            ExitCode::from(1)
        })
}

/// `chat-gateway emulator`: runs the local Chat until SIGTERM/SIGINT.
pub fn emulator(args: &crate::cli::EmulatorArgs) -> ExitCode {
    init_default_logging();
    raise_fd_limit();
    let cfg = crate::emulator::EmulatorConfig::from_args(args);
    if let Err(e) = cfg.validate() {
        eprintln!("chat-gateway emulator: {e}");
        return ExitCode::from(1);
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let listener = match server::listener::bind(args.listen) {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "chat-gateway emulator: cannot listen on {}: {e}",
                    args.listen
                );
                return ExitCode::from(1);
            }
        };
        match crate::emulator::run(listener, cfg, server::listener::termination_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("chat-gateway emulator: {e}");
                ExitCode::from(1)
            }
        }
    })
}

/// `chat-gateway demo`: the emulator and the gateway in one process on loopback, the
/// gateway pointed at the emulator, and curl commands to paste. Ctrl-C stops both.
pub fn demo(args: &crate::cli::DemoArgs) -> ExitCode {
    telemetry::init(LogFormat::Text, "warn");
    raise_fd_limit();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        match run_demo(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("chat-gateway demo: {e}");
                ExitCode::from(1)
            }
        }
    })
}

async fn run_demo(args: &crate::cli::DemoArgs) -> Result<(), String> {
    let emu_cfg = crate::emulator::EmulatorConfig {
        listen: args.emulator_listen,
        ..Default::default()
    };
    let emu = crate::emulator::spawn(emu_cfg.clone())
        .await
        .map_err(|e| format!("emulator: {e}"))?;
    let env = [
        ("CHAT_GATEWAY__SERVER__LISTEN", args.listen.to_string()),
        ("CHAT_GATEWAY__CHAT__SDKAPPID", emu_cfg.sdkappid.to_string()),
        ("CHAT_GATEWAY__CHAT__IDENTIFIER", emu_cfg.identifier.clone()),
        ("CHAT_GATEWAY__CHAT__SECRET_KEY", emu_cfg.secret_key.clone()),
        ("CHAT_GATEWAY__CHAT__REGION", "singapore".to_string()),
        ("CHAT_GATEWAY__CHAT__BASE_URL", emu.base_url()),
        ("CHAT_GATEWAY__CACHE__TTL_SECS", "30".to_string()),
    ]
    .map(|(k, v)| (k.to_string(), v));
    let settings = config::load_with_env(None, env).map_err(|e| e.to_string())?;
    let listeners = server::Listeners::bind(&settings.server)?;
    let state = AppState::new(settings)?;
    let gw = listeners.main.local_addr().map_err(|e| e.to_string())?;
    let next = next_page_cursor(&emu).await.unwrap_or_default();
    let url = format!("http://{gw}/v4/recentcontact/get_list");
    let curl = |body: &str| {
        format!("curl -s -i -X POST {url} -H 'content-type: application/json' -d '{body}'")
    };
    say(format!(
        "chat-gateway demo: gateway on http://{gw}, local Chat emulator on {}",
        emu.base_url()
    ));
    say(format!(
        "(sdkappid {}, admin {}; the gateway adds the credentials)",
        emu_cfg.sdkappid, emu_cfg.identifier
    ));
    say("");
    say("# 1. the first page of user_0001's conversations (x-cache: MISS)");
    say(curl(r#"{"From_Account":"user_0001"}"#));
    say("# 2. the same page again, from the cache (x-cache: HIT)");
    say(curl(r#"{"From_Account":"user_0001"}"#));
    say("# 3. the next page, with the cursors the first page returned");
    say(curl(&next));
    say("# 4. the gateway's metrics");
    say(format!("curl -s http://{gw}/metrics"));
    say("");
    say("Press Ctrl-C to stop.");
    let drained = server::run(listeners, state, server::listener::termination_signal()).await;
    emu.shutdown().await;
    say(format!("chat-gateway demo: stopped (drained: {drained})"));
    Ok(())
}

/// Prints a line, ignoring a closed stdout (a demo piped into `head` must not panic).
fn say(line: impl AsRef<str>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line.as_ref());
    let _ = out.flush();
}

/// The body of user_0001's second page, from the emulator's first page's cursors.
async fn next_page_cursor(emu: &crate::emulator::EmulatorHandle) -> Option<String> {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let cfg = emu.config();
    let uri = format!(
        "{}/v4/recentcontact/get_list?sdkappid={}&identifier={}&usersig={}&random=1&contenttype=json",
        emu.base_url(),
        cfg.sdkappid,
        cfg.identifier,
        emu.admin_usersig()
    );
    let req = http::Request::post(uri)
        .body(Full::new(bytes::Bytes::from_static(br#"{"From_Account":"user_0001","TimeStamp":0,"StartIndex":0,"TopTimeStamp":0,"TopStartIndex":0,"AssistFlags":63}"#)))
        .ok()?;
    let body = client
        .request(req)
        .await
        .ok()?
        .into_body()
        .collect()
        .await
        .ok()?
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    Some(format!(
        r#"{{"From_Account":"user_0001","TimeStamp":{},"StartIndex":{},"TopTimeStamp":{},"TopStartIndex":{}}}"#,
        v["TimeStamp"], v["StartIndex"], v["TopTimeStamp"], v["TopStartIndex"]
    ))
}
