//! Checks and reports on rewritten models: `verify` (reference outputs, the original's outputs,
//! DAGR against its reference, finite differences, backend parity), `diagnose` (geometry
//! metrics, robustness, pictures) and `inspect` (what a model holds and how to rewrite it).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod diagnose;
pub mod inspect;
pub mod plots;
pub mod verify;
