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
    let config = cli.config.as_deref();
    match &cli.command {
        None | Some(Command::Serve) => cmd::serve(config),
        Some(Command::CheckConfig) => cmd::check_config(config),
        Some(Command::Usersig(args)) => cmd::usersig(config, args),
        Some(Command::Emulator(args)) => cmd::emulator(args),
        Some(Command::Demo(args)) => cmd::demo(args),
    }
}
