//! `push-manager admin <verb>`: the command-line client of a running manager's admin API
//! (`proto/admin.proto`). Output is [`crate::report`]'s, the same as `queue-dump`'s for a
//! stopped store: `admin nodes` matches `queue-dump summary`, `admin peek` matches
//! `queue-dump list`, and `replay` / `purge` take the same flags in both.

use std::io::Write;
use std::time::Duration;

use serde_json::json;

use crate::config::parse_duration;
use crate::proto::admin as pb;
use crate::proto::admin::admin_client::AdminClient;
use crate::report::{self, is_broken_pipe, ListArgs, PurgeArgs, ReplayArgs};

/// `push-manager admin`: inspect and steer a running manager.
#[derive(clap::Args, Debug)]
#[command(
    about = "Inspect and steer a running manager through its admin API (same port as \
             Broadcast; a stopped manager's data dir is read with queue-dump instead)"
)]
pub struct AdminArgs {
    /// The manager's address (its --listen)
    #[arg(
        long,
        value_name = "HOST:PORT",
        env = "PUSH_MANAGER_SERVER",
        default_value = "127.0.0.1:50051"
    )]
    pub server: String,
    /// Deadline of each call (drain adds its --wait)
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub timeout: Duration,
    /// Print JSON: one object, or one object per line for entry listings
    #[arg(long, global = true)]
    pub json: bool,
    /// TLS and token toward the manager (its --admin-token-file; without one, a manager
    /// without mTLS answers loopback callers only)
    #[command(flatten)]
    pub security: crate::client::ClientSecurity,
    /// What to do
    #[command(subcommand)]
    pub verb: Verb,
}

/// The admin verbs.
#[derive(clap::Subcommand, Debug)]
pub enum Verb {
    /// Every known node: state, address, pending, dead letters, oldest age, backoff, last error
    Nodes,
    /// One node's live queue (or dead letters) in queue order
    Peek(ListArgs),
    /// Move dead letters back into the node's live queue (new sequence, attempts reset,
    /// msg_id kept)
    Replay(ReplayArgs),
    /// Drop a node's entries, printing what was dropped
    Purge(PurgeArgs),
    /// Pause deliveries to a node; its queue keeps growing; survives restarts
    Hold {
        /// The node to hold
        node: String,
    },
    /// Resume deliveries to a held node
    Release {
        /// The node to release
        node: String,
    },
    /// Stop accepting broadcasts for good, keep delivering, report when every queue is empty
    Drain {
        /// How long to wait for the queues to empty, like 30s; 0s = report at once
        #[arg(
        long,
        value_name = "DURATION",
        default_value = "0s",
        value_parser = parse_duration
    )]
        wait: Duration,
    },
}

/// Errors of the admin client.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The manager could not be reached.
    #[error(
        "cannot connect to push-manager at {addr}: {reason} (is it running there? a stopped \
         manager's data dir is read with queue-dump)"
    )]
    Connect {
        /// The address tried.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// The manager serves no admin API.
    #[error(
        "the manager at {addr} does not serve the admin API (started with --no-admin?); \
         restart it without --no-admin"
    )]
    Disabled {
        /// The address.
        addr: String,
    },
    /// The manager refused the call.
    #[error("{verb} refused: {code:?}: {message}")]
    Refused {
        /// The verb.
        verb: &'static str,
        /// gRPC status code.
        code: tonic::Code,
        /// The manager's explanation.
        message: String,
    },
    /// Writing the output failed (other than a closed pipe, which is not an error).
    #[error("cannot write output: {0}")]
    Output(#[source] std::io::Error),
    /// A TLS or token file of the client could not be used.
    #[error("{0}")]
    Security(String),
    /// A drain ended with entries still queued.
    #[error("drain: {0} live entries still queued when the wait ended")]
    NotEmpty(u64),
}

impl AdminError {
    /// The process exit code: 3 for a drain that did not empty the queues, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            AdminError::NotEmpty(_) => 3,
            _ => 1,
        }
    }
}

async fn connect(
    addr: &str,
    timeout: Duration,
    security: &crate::client::ClientSecurity,
) -> Result<AdminClient<crate::client::ManagerChannel>, AdminError> {
    let auth = security
        .load()
        .map_err(|e| AdminError::Security(e.to_string()))?;
    let channel = crate::client::channel(addr, timeout, &auth)
        .await
        .map_err(|reason| AdminError::Connect {
            addr: addr.to_string(),
            reason,
        })?;
    Ok(AdminClient::new(channel))
}

/// Runs one admin verb, printing its result on stdout.
pub async fn run(args: AdminArgs) -> Result<(), AdminError> {
    let mut client = connect(&args.server, args.timeout, &args.security).await?;
    let refused = |verb: &'static str, addr: &str| {
        let addr = addr.to_string();
        move |s: tonic::Status| {
            if s.code() == tonic::Code::Unimplemented {
                AdminError::Disabled { addr }
            } else {
                AdminError::Refused {
                    verb,
                    code: s.code(),
                    message: s.message().to_string(),
                }
            }
        }
    };
    let mut out = std::io::stdout().lock();
    let w: &mut dyn Write = &mut out;
    let json = args.json;
    let printed = match args.verb {
        Verb::Nodes => {
            let r = client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(refused("nodes", &args.server))?
                .into_inner();
            print_nodes(w, &r.nodes, r.draining, json)
        }
        Verb::Peek(a) => {
            let r = client
                .peek_queue(pb::PeekQueueRequest {
                    node_id: a.node.clone(),
                    dead_letter: a.dead_letter,
                    limit: a.limit.min(report::MAX_LISTED) as u32,
                    filter: Some(report::filter_to_proto(&a.filter.filter(a.from))),
                })
                .await
                .map_err(refused("peek", &args.server))?
                .into_inner();
            report::entries(w, &r.entries, json)
        }
        Verb::Replay(a) => {
            let r = client
                .replay_dead_letters(pb::ReplayDeadLettersRequest {
                    node_id: a.node.clone(),
                    filter: Some(report::filter_to_proto(&a.filter.filter(None))),
                    all: a.all,
                    dry_run: a.dry_run,
                })
                .await
                .map_err(refused("replay", &args.server))?
                .into_inner();
            report::replay(w, &a.node, &r, json)
        }
        Verb::Purge(a) => {
            let r = client
                .purge_queue(pb::PurgeQueueRequest {
                    node_id: a.node.clone(),
                    dead_letter: a.dead_letter,
                    filter: Some(report::filter_to_proto(&a.filter.filter(None))),
                    confirm: a.yes,
                    dry_run: a.dry_run,
                })
                .await
                .map_err(refused("purge", &args.server))?
                .into_inner();
            report::purge(w, &a.node, a.dead_letter, &r, json)
        }
        Verb::Hold { node } => {
            let n = client
                .hold_node(pb::NodeRequest { node_id: node })
                .await
                .map_err(refused("hold", &args.server))?
                .into_inner();
            print_nodes(w, &[n], false, json)
        }
        Verb::Release { node } => {
            let n = client
                .release_node(pb::NodeRequest { node_id: node })
                .await
                .map_err(refused("release", &args.server))?
                .into_inner();
            print_nodes(w, &[n], false, json)
        }
        Verb::Drain { wait } => {
            let mut req = tonic::Request::new(pb::DrainRequest {
                wait_ms: wait.as_millis() as u64,
            });
            req.set_timeout(args.timeout + wait);
            let r = client
                .drain(req)
                .await
                .map_err(refused("drain", &args.server))?
                .into_inner();
            let left: u64 = r.nodes.iter().map(|n| n.pending).sum();
            let printed = if json {
                report::write_json(
                    w,
                    &json!({
                        "empty": r.empty,
                        "pending": left,
                        "nodes": r.nodes.iter().map(report::node_json).collect::<Vec<_>>(),
                    }),
                )
            } else {
                writeln!(
                    w,
                    "draining: broadcasts are refused; {}",
                    if r.empty {
                        "every live queue is empty".to_string()
                    } else {
                        format!("{left} live entries still queued")
                    }
                )
                .and_then(|()| report::nodes_table(w, &r.nodes, false))
            };
            printed.map_err(AdminError::Output)?;
            return match r.empty {
                true => Ok(()),
                false => Err(AdminError::NotEmpty(left)),
            };
        }
    };
    match printed {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other.map_err(AdminError::Output),
    }
}

fn print_nodes(
    w: &mut dyn Write,
    nodes: &[pb::NodeInfo],
    draining: bool,
    json: bool,
) -> std::io::Result<()> {
    if json {
        report::write_json(
            w,
            &json!({
                "draining": draining,
                "nodes": nodes.iter().map(report::node_json).collect::<Vec<_>>(),
            }),
        )
    } else {
        if draining {
            writeln!(w, "draining: broadcasts are refused")?;
        }
        report::nodes_table(w, nodes, false)
    }
}
