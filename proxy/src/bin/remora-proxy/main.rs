//! `remora-proxy`: the sidecar binary — flags and `REMORA_*` variables into the library's
//! [`remora_proxy::Config`], logging, signals, and `await` (the Job runner). Everything it
//! runs is the public library API.

mod cli;
mod init;
mod job;

fn main() -> std::process::ExitCode {
    cli::main()
}
