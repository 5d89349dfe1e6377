//! pyrt's engine: the parts of the hub's hot path that are written in Rust.
//!
//! No Python in here: the `pyrt-core` crate binds it as `pyrt._core`.

pub mod fanout;
pub mod frame;
pub mod matcher;
pub mod pgoutput;
