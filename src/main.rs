//! The `dagr-inject` command line. Library errors are typed; here they become `anyhow` errors,
//! printed as one message with a non-zero exit.

mod cli;

fn main() {
    let args = cli::normalize_args(std::env::args_os().collect());
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
