//! The `dagr-inject` command line (`dagr_inject::cli`; the Python package's `dagr-inject`
//! command runs the same function).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

fn main() {
    std::process::exit(dagr_inject::cli::main_with(std::env::args_os().collect()));
}
