//! The subcommands, one function each. `main.rs` only parses and dispatches.

use std::path::Path;
use std::process::ExitCode;

use tokio::net::TcpListener;

use crate::cli::UsersigArgs;
use crate::config::{self, LogFormat, Settings};
use crate::server::{self, AppState};
use crate::telemetry;

/// Loads the config or prints why not.
fn load(path: Option<&Path>) -> Result<Settings, ExitCode> {
    config::load(path).map_err(|e| {
        eprintln!("chat-gateway: {e}");
        ExitCode::from(1)
    })
}

/// `chat-gateway [serve]`: serves until SIGTERM/SIGINT or `/quitquitquit`.
pub fn serve(config_path: Option<&Path>) -> ExitCode {
    let settings = match load(config_path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    telemetry::init(settings.log.format, &settings.log.level);
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
        let listen = settings.server.listen;
        let state = match AppState::new(settings) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("chat-gateway: {e}");
                return ExitCode::from(1);
            }
        };
        let listener = match TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("chat-gateway: cannot listen on {listen}: {e}");
                return ExitCode::from(1);
            }
        };
        let _watcher = config::reload::Reloader::new(
            config_path.map(Path::to_path_buf),
            state.settings.clone(),
            state.live.clone(),
        )
        .spawn();
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(listen = %addr, upstream = %state.settings.chat.base_url, "chat-gateway serving");
        let drained = server::run(listener, state, server::listener::termination_signal()).await;
        tracing::info!(drained, "chat-gateway stopped");
        ExitCode::SUCCESS
    })
}

/// `chat-gateway check-config`: validates and prints the effective config, secrets
/// redacted.
pub fn check_config(config_path: Option<&Path>) -> ExitCode {
    match load(config_path) {
        Ok(s) => {
            println!("{}", s.to_redacted_json());
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

/// `chat-gateway emulator`: runs the local Chat until SIGTERM/SIGINT.
pub fn emulator(args: &crate::cli::EmulatorArgs) -> ExitCode {
    init_default_logging();
    let _ = args;
    eprintln!("chat-gateway: the emulator is not built yet");
    ExitCode::from(2)
}

/// `chat-gateway demo`: emulator plus gateway, and curl commands to try.
pub fn demo(args: &crate::cli::DemoArgs) -> ExitCode {
    init_default_logging();
    let _ = args;
    eprintln!("chat-gateway: the demo is not built yet");
    ExitCode::from(2)
}
