//! Moved to [`crate::invalidate`] (the door composes the cache and the fleet, so it
//! sits above both); these names stay until the fleet's documentation links to the
//! new place.

pub use crate::invalidate::{Dropped, Invalidator, Source};
