//! The upstream's contract, and nothing else: UserSig, regions, the response envelope,
//! the command table, the table of cacheable reads and the table of invalidations.
//! No I/O lives here.

pub mod commands;
pub mod effects;
pub mod envelope;
pub mod reads;
pub mod region;
pub mod usersig;
