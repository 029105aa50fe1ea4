//! One handler per route.

pub mod admin;
pub mod callback;
pub mod get_list;
pub mod health;
pub mod items;
pub mod metrics;
pub mod passthrough;
