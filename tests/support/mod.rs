//! Helpers shared by integration tests.
#![allow(dead_code)]

#[cfg(feature = "proxy")]
pub mod proxy;
pub mod redis_server;
