//! dagr-inject: rewrite ONNX multimodal graphs to add DAGR (dispersive and anchoring geometric
//! regularization), in standard ONNX operators, build their training graphs, and run them on
//! tract or ONNX Runtime.
//!
//! The layers are crates, each depending only on the ones before it (the compiler forbids a
//! back-edge):
//! `dagr-onnx` (model I/O, graph index, shape facts, builders; errors, bounds, the fault hook) ->
//! `dagr-ops` (every operator as one registry entry: shape and value inference, gradient rule,
//! schema versions covered, finite-difference cases) -> `dagr-autodiff` (the reverse-mode
//! engine over that registry) -> `dagr-core` (encoder
//! location, the regularizer and its reference, training graphs, optimizers as ONNX nodes, step
//! graphs, embedding geometry) -> `dagr-runtime` (host tensors, `.npz`, datasets, tract and ONNX
//! Runtime, `Stepper`) -> `dagr-train` (the loop, checkpoints, evaluation) -> `dagr-report`
//! (verify, diagnose, inspect) -> this crate: the `dagr-inject` command (`cli`), and this facade,
//! which re-exports each layer under a short name.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

// The command line names this crate by its name, as the binary did.
extern crate self as dagr_inject;

/// The `dagr-inject` command line (the binary and the Python package's command run
/// `cli::main_with`): the one place, with the Python binding, that prints.
pub mod cli;

pub use dagr_autodiff as autodiff;
pub use dagr_core as dagr;
pub use dagr_core::locate;
pub use dagr_dist as dist;
pub use dagr_onnx as onnx;
pub use dagr_onnx::{error, fault, limits};
pub use dagr_ops as ops;
pub use dagr_report::{diagnose, inspect, plots, verify};
pub use dagr_runtime as runtime;
pub use dagr_runtime::npz;
pub use dagr_train as train;

pub use dagr_core::{inject, Config};
pub use error::{Error, Result};

#[doc(hidden)]
pub use tikv_jemallocator;

/// The allocator of the `dagr-inject` executable (`src/main.rs`) and of the Python module
/// (`crates/python`, which runs the command in-process): jemalloc, keeping what the process
/// frees for its next allocations instead of returning it to the system (dirty and muzzy decay
/// off, so the process holds its peak use to its end). tract allocates every tensor of a step
/// anew, and glibc's malloc maps each block past 32 MB fresh and unmaps it when freed: each step
/// paid the kernel for mapping its gigabytes of pages again (500M parameters, AdamW on tract: two
/// steps 40.1 s with glibc or jemalloc's default decay, 13.5 s with this, the same peak RSS).
/// ONNX Runtime has its own arena and its own allocator. A module Python opens at run time cannot
/// load jemalloc's initial-exec thread-local storage ("cannot allocate memory in static TLS
/// block"): the Python crate enables tikv-jemallocator's `disable_initial_exec_tls`.
#[macro_export]
macro_rules! jemalloc_keeping_freed_pages {
    () => {
        #[global_allocator]
        static GLOBAL: $crate::tikv_jemallocator::Jemalloc = $crate::tikv_jemallocator::Jemalloc;

        /// jemalloc's settings, read when it starts.
        #[allow(non_upper_case_globals)]
        #[unsafe(export_name = "_rjem_malloc_conf")]
        pub static malloc_conf: &[u8] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1\0";
    };
}
