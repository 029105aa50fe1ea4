//! The HTTP server: accept loop, routing, and one handler per route.

pub mod listener;
