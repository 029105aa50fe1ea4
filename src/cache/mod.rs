//! The get_list page cache: what a key is ([`key`]), where pages live and how an
//! account's pages are dropped ([`store`]), and how identical misses share one fetch
//! ([`coalesce`]).

pub mod coalesce;
pub mod key;
pub mod store;
