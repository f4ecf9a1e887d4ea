//! The `remora` command line. `main.rs` only calls [`main`].

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "remora", version, about = "remora: a small service mesh")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a local mesh on loopback: three gRPC backends behind their own proxies, a client
    /// calling them through its proxy; print what happened.
    Demo(DemoArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// gRPC calls the client makes.
    #[arg(long, default_value = "3000")]
    pub requests: usize,
    /// Calls in flight at once (all on one HTTP/2 connection, like a gRPC channel).
    #[arg(long, default_value = "16")]
    pub concurrency: usize,
    /// After the run, keep the mesh up until Ctrl-C (to look at the admin URLs).
    #[arg(long)]
    pub hold: bool,
    /// Upper bound on the whole run.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("REMORA_LOG").unwrap_or_else(|_| "warn".into());
    if let Err(e) = remora_proxy::cli::init_logging(&filter, remora_proxy::cli::LogFormat::Plain) {
        eprintln!("remora: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("remora: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Demo(args) => runtime.block_on(async move {
            match crate::demo::run(args).await {
                Ok(report) if report.failed == 0 => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("remora demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
    }
}
