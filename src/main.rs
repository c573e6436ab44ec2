//! The `dagr-inject` command line (`dagr_inject::cli`; the Python package's `dagr-inject`
//! command runs the same function).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

dagr_inject::jemalloc_keeping_freed_pages!();

fn main() {
    // Output piped into a reader that stops early (`dagr-inject train --help | head`) ends the
    // process quietly, as for other command-line tools, instead of a panic on the failed write.
    // (Only the executable does this; the Python binding leaves its interpreter's handling.)
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(dagr_inject::cli::main_with(std::env::args_os().collect()));
}
