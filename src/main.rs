//! The `chat-gateway` binary: parse the command line and dispatch. Everything else
//! lives in the library.

use std::process::ExitCode;

use clap::Parser;

use chat_gateway::cli::{Cli, Command};

/// mimalloc: it gives freed memory back under churn where glibc's allocator keeps a
/// full cache's worth of holes (measured with `bench/rss.sh`), and is faster on the
/// hot path.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use chat_gateway::cmd;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `chat-gateway --config FILE [serve|check-config|usersig]` and
    // `chat-gateway <subcommand> --config FILE` both work; the emulator and the demo
    // configure themselves.
    let config = |sub: &Option<std::path::PathBuf>| {
        cli.config
            .clone()
            .or_else(|| sub.clone())
            .or_else(|| std::env::var_os("CHAT_GATEWAY_CONFIG").map(Into::into))
    };
    match &cli.command {
        None => cmd::serve(config(&None).as_deref()),
        Some(Command::Serve(c)) => cmd::serve(config(&c.config).as_deref()),
        Some(Command::CheckConfig(c)) => cmd::check_config(config(&c.config).as_deref()),
        Some(Command::Usersig(args)) => cmd::usersig(config(&args.config.config).as_deref(), args),
        Some(Command::Emulator(_) | Command::Demo(_)) if cli.config.is_some() => {
            eprintln!(
                "chat-gateway: the emulator and the demo configure themselves and read no config file; serve with `chat-gateway --config FILE`"
            );
            ExitCode::from(2)
        }
        Some(Command::Emulator(args)) => cmd::emulator(args),
        Some(Command::Demo(args)) => cmd::demo(args),
    }
}
