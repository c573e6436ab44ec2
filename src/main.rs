//! The `dagr-inject` command line. Library errors are typed; here they become `anyhow` errors,
//! printed as one message (settings named as flags) with a non-zero exit (128 + the signal's number for a run stopped by
//! Ctrl-C or SIGTERM, as a shell reports it).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod cli;
mod signals;

fn main() {
    // A panic inside tract that the runtime turns into an error is reported by that error, not
    // also by the default hook's "thread 'main' panicked at ..." lines.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !dagr_inject::runtime::tract_backend::in_guarded_call() {
            default_hook(info)
        }
    }));
    let args = cli::normalize_args(std::env::args_os().collect());
    if let Err(e) = cli::run(args) {
        eprintln!("error: {}", cli::flags_for_fields(&format!("{e:#}")));
        let code = match e.downcast_ref::<dagr_inject::Error>() {
            Some(dagr_inject::Error::Interrupted(_)) => 128 + signals::received().unwrap_or(2),
            _ => 1,
        };
        std::process::exit(code);
    }
}
