//! `remora-proxy`: the sidecar binary — flags and `REMORA_*` variables into the library's
//! [`remora_proxy::Config`], logging, signals, and `await` (the Job runner). Everything it
//! runs is the public library API.

mod cli;
mod init;
mod job;

/// Freed small blocks are kept per thread for reuse (`remora_proxy::alloc`): the threads that
/// carry requests opt in where the runtime is built (`cli::main`).
#[global_allocator]
static ALLOC: remora_proxy::alloc::Pooled = remora_proxy::alloc::Pooled;

fn main() -> std::process::ExitCode {
    cli::main()
}
