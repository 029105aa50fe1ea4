//! One handler per route.

pub mod get_list;
pub mod health;
pub mod metrics;
