//! `push-manager`: serve | send | admin | demo. Parses arguments, sets up logging, and calls the
//! library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use push_manager::{admin_client, client, config, demo, server, shutdown};

/// A durable, queue-backed broadcast dispatcher: every accepted broadcast is fsynced to a
/// per-node queue before it is acked, then delivered to every connect-node with
/// exponential backoff.
#[derive(Parser)]
#[command(name = "push-manager", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (flags > PUSH_MANAGER_* env vars > --config TOML file > defaults).
    Serve(Box<config::ServeArgs>),
    /// Send one or more broadcasts to a running manager and print each reply.
    Send(client::SendArgs),
    /// Inspect and steer a running manager: nodes, peek, replay, purge, hold, release, drain.
    Admin(admin_client::AdminArgs),
    /// Show the whole flow on this machine: a manager, three connect-node-sims, a node
    /// outage and a manager SIGKILL, then a per-node report. Needs nothing installed.
    Demo {
        /// Keep the demo's working directory (data dir, logs, received-message records).
        #[arg(long)]
        keep: bool,
    },
}

/// Logs to stderr, filtered by `RUST_LOG` (else `default`), as readable text or JSON lines.
fn init_logging(default: &str, format: config::LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        config::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        config::LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve(args) => {
            // Resolved first: the config decides the log format.
            let cfg = match args.resolve() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("push-manager: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging("info", cfg.log_format);
            // Listening from here on: a signal during start-up begins the drain too.
            let signals = shutdown::Signals::new();
            match server::run(cfg, shutdown::exit_on_second_signal(signals)).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("push-manager: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Send(args) => {
            init_logging("warn", config::LogFormat::Text);
            match client::send(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("push-manager send: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Admin(args) => {
            init_logging("warn", config::LogFormat::Text);
            match admin_client::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("push-manager admin: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Cmd::Demo { keep } => {
            init_logging("warn", config::LogFormat::Text);
            let work =
                std::env::temp_dir().join(format!("push-manager-demo-{}", std::process::id()));
            if let Err(e) = std::fs::create_dir_all(&work) {
                eprintln!("push-manager demo: cannot create {}: {e}", work.display());
                return ExitCode::FAILURE;
            }
            let result = demo::run(&work).await;
            if keep || result.is_err() {
                eprintln!("demo files kept in {}", work.display());
            } else {
                let _ = std::fs::remove_dir_all(&work);
            }
            match result {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("push-manager demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
