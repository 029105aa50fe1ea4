//! The upstream's contract, and nothing else: UserSig, regions, the response envelope
//! and the command table. No I/O lives here.

pub mod commands;
pub mod envelope;
pub mod region;
pub mod usersig;
