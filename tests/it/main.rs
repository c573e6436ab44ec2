//! The integration tests, one binary (linking tract, ONNX Runtime and resvg once): one module
//! per area.

mod backend_models;
mod cli;
mod common;
mod dagr_finite_diff;
mod dagr_fixtures;
mod dagr_hand;
mod diagnose;
mod distributed;
mod frameworks;
mod grad_rules;
mod inject_errors_and_dtypes;
mod inject_models;
mod locate;
mod onnx_io;
mod reliability;
mod shape_inference;
mod train_graphs;
mod train_loop;
mod upgrade;
mod zoo;
