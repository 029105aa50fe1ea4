//! chat-gateway (layout doc written below as modules land).

pub mod chat;
pub mod cli;
pub mod emulator;
pub mod server;
