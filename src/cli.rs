//! Command-line interface (clap). `main.rs` parses this and dispatches.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Where the configuration comes from, shown at the end of `--help`.
const CONFIG_HELP: &str = "\
Configuration: built-in defaults, then the TOML file (--config FILE, or the
CHAT_GATEWAY_CONFIG environment variable), then environment variables named
CHAT_GATEWAY__<SECTION>__<KEY>, e.g.
    CHAT_GATEWAY__CHAT__SDKAPPID=1400000000
    CHAT_GATEWAY__CHAT__SECRET_KEY_FILE=/run/secrets/chat_key
    CHAT_GATEWAY__CACHE__TTL_SECS=5
(lists comma-separated). config/default.toml documents every key; `chat-gateway
demo` runs the gateway in front of a local Chat emulator with no config at all.";

/// chat-gateway: a caching, credential-injecting sidecar for the Tencent Cloud Chat
/// REST admin API.
#[derive(Debug, Parser)]
#[command(name = "chat-gateway", version, about, long_about = None, after_help = CONFIG_HELP)]
pub struct Cli {
    /// Config file (TOML) for serving. Also read from CHAT_GATEWAY_CONFIG.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `--config` of the subcommands that read the gateway's configuration.
#[derive(Debug, Args, Clone, Default)]
pub struct ConfigArg {
    /// Config file (TOML). Also read from CHAT_GATEWAY_CONFIG.
    #[arg(long, short = 'c', env = "CHAT_GATEWAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// What to do; with none, the gateway serves.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve (the default when no subcommand is given).
    #[command(after_help = CONFIG_HELP)]
    Serve(ConfigArg),
    /// Validate the config and print the effective configuration as TOML (the
    /// file's own keys, secrets redacted), which can be used as a config file.
    #[command(after_help = CONFIG_HELP)]
    CheckConfig(ConfigArg),
    /// Print a UserSig made with the configured key, for ops debugging.
    #[command(after_help = CONFIG_HELP)]
    Usersig(UsersigArgs),
    /// Run the local Chat emulator (no Tencent account needed).
    Emulator(EmulatorArgs),
    /// Start the emulator and the gateway together and print curl commands to try.
    Demo(DemoArgs),
}

/// `chat-gateway usersig`
#[derive(Debug, Args)]
pub struct UsersigArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Identifier to sign for (default: chat.identifier); 1 to 32 bytes, no spaces
    /// or control characters, as Chat requires of a UserID.
    #[arg(long)]
    pub identifier: Option<String>,
    /// Lifetime in seconds, > 0 (default: chat.usersig_ttl_secs).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub expire: Option<u64>,
}

/// `chat-gateway emulator`
#[derive(Debug, Args, Clone)]
pub struct EmulatorArgs {
    /// Address to listen on (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    /// SDKAppID the emulator accepts.
    #[arg(long, default_value_t = 1400000000)]
    pub sdkappid: u64,
    /// Secret key the emulator verifies UserSigs with.
    #[arg(long, default_value = "emulator-secret-key", hide_default_value = true)]
    pub secret_key: String,
    /// The app admin identifier.
    #[arg(long, default_value = "administrator")]
    pub identifier: String,
    /// Number of synthetic accounts (user_0001 ...).
    #[arg(long, default_value_t = 1000)]
    pub accounts: u32,
    /// Seed of the synthetic world; the same seed gives the same world.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Rate of 50004 answers, 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0)]
    pub fail_50004: f64,
    /// Rate of 50005 answers, 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0)]
    pub fail_50005: f64,
    /// Rate of dropped connections, 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0)]
    pub drop_rate: f64,
    /// Fixed added latency, milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Random extra latency, 0 to this many milliseconds.
    #[arg(long, default_value_t = 0)]
    pub jitter_ms: u64,
    /// Calls per second per API before 60007 (0 disables the limit).
    #[arg(long, default_value_t = 200)]
    pub rate_limit: u32,
    /// Where to POST Chat webhooks after changes (messages, profiles, friends,
    /// groups).
    #[arg(long)]
    pub callback_url: Option<String>,
    /// Token for the webhooks' Sign.
    #[arg(long)]
    pub callback_token: Option<String>,
}

/// `chat-gateway demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Gateway address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Emulator address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub emulator_listen: SocketAddr,
}
