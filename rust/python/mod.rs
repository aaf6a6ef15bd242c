//! The binding layer: the Python objects and functions of `snapperable._core`, over the
//! pure-Rust domain modules. Only conversion (and releasing the GIL around I/O) lives
//! here; each file binds one domain module.

pub mod imports;
pub mod keys;
pub mod process;
pub mod store;
