//! `queue-dump`: inspect, export, replay and purge a stopped push-manager's store.
//!
//! A thin tool: it parses arguments, opens the store, calls the store's typed inspection
//! API (`push_manager::store::inspect`) and prints with `push_manager::report`, the same
//! renderers as `push-manager admin`. A running manager locks its store; this tool then says
//! so and points to the admin API.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use serde_json::json;

use push_manager::report::{self, is_broken_pipe, ExportRecord, FilterArgs, ListArgs};
use push_manager::report::{PurgeArgs, ReplayArgs};
use push_manager::store::{now_ms, Filter, QueueKind, Store, StoreError};

/// Exit code when the store is locked by a running manager.
const EXIT_LOCKED: u8 = 3;
/// Exit code when `verify` found problems it did not repair.
const EXIT_PROBLEMS: u8 = 4;
/// Entries read per page while exporting.
const EXPORT_PAGE: usize = 1000;

/// Inspect, export, replay and purge a stopped push-manager's store.
#[derive(Parser)]
#[command(
    name = "queue-dump",
    version,
    after_help = "Exit codes: 0 done; 1 failed (the message says why); 2 bad arguments; \
                  3 the store is locked by a running manager (use `push-manager admin` on it); \
                  4 verify found problems it did not repair.\n\n\
                  Read-only commands (summary, verify without --repair, list, show, export, \
                  and any --dry-run) never write to the store."
)]
struct Cli {
    /// The manager's data dir (the one holding store/)
    #[arg(
        long,
        value_name = "DIR",
        env = "PUSH_MANAGER_DATA_DIR",
        default_value = "./data"
    )]
    data_dir: PathBuf,
    /// Print JSON (one object; entry listings and export: one object per line)
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Per node: pending, dead letters, oldest entry's age, payload bytes, state and address
    /// as last known; the store's format and size
    Summary {
        /// Add a node x age matrix of live entries (<=1m, <=10m, <=1h, <=1d, older)
        #[arg(long)]
        ages: bool,
    },
    /// Read every record, check checksums and that every live entry's payload exists
    Verify {
        /// Move bad records to quarantine (`x/<key>`) and entries without payload to dead letters
        #[arg(long)]
        repair: bool,
    },
    /// One node's live queue (or dead letters) in queue order
    List(ListArgs),
    /// One message in full: topic, headers, payload, and which nodes still hold it
    Show {
        /// The message's msg_id
        msg_id: String,
        /// Write only the payload's bytes to stdout
        #[arg(long)]
        raw: bool,
    },
    /// Write entries as JSON lines (payload in base64), for archiving or `import`
    Export {
        /// Only this node (default: every node)
        #[arg(long, value_name = "ID")]
        node: Option<String>,
        /// Export dead letters instead of live entries
        #[arg(long)]
        dead_letter: bool,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Queue the entries of an export file again (new sequence numbers; entries a node
    /// already holds are skipped)
    Import {
        /// The export file; - reads standard input
        file: PathBuf,
        /// Check the file and print what would be imported, change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Move dead letters back into the node's live queue (new sequence, attempts reset,
    /// msg_id kept)
    Replay(ReplayArgs),
    /// Drop a node's entries, printing what was dropped
    Purge(PurgeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = run(&cli, &mut out).and_then(|code| {
        out.flush()?;
        Ok(code)
    });
    match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<io::Error>().is_some_and(is_broken_pipe) => ExitCode::SUCCESS,
        Err(e) => {
            // Whatever was printed so far goes out before the error.
            let _ = out.flush();
            if let Some(locked @ StoreError::Locked { .. }) = e.downcast_ref::<StoreError>() {
                eprintln!(
                    "queue-dump: {locked}\n\
                     hint: on a running manager use `push-manager admin --server HOST:PORT \
                     nodes` (also peek, replay, purge, hold, release)"
                );
                return ExitCode::from(EXIT_LOCKED);
            }
            eprintln!("queue-dump: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause once (store errors already include theirs).
fn message(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

/// Opens the store for a command: read-only unless it writes.
fn open(data_dir: &Path, write: bool) -> anyhow::Result<Store> {
    if write {
        // Store::open would create an empty store where there is none: check first.
        if !data_dir.join("store").join("conf").exists() {
            bail!(
                "there is no push-manager store in {}; check --data-dir (the manager's data \
                 dir, the one holding store/)",
                data_dir.display()
            );
        }
        Ok(Store::open(data_dir)?)
    } else {
        Ok(Store::open_read_only(data_dir)?)
    }
}

fn known_node(store: &Store, node: &str) -> anyhow::Result<()> {
    let now = now_ms();
    if store
        .summaries(false, now)?
        .iter()
        .any(|(id, _, _)| id == node)
    {
        Ok(())
    } else {
        bail!("node {node:?} is not known in this store; `queue-dump summary` lists the nodes")
    }
}

fn run(cli: &Cli, w: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let json = cli.json;
    let dir = &cli.data_dir;
    match &cli.cmd {
        Cmd::Summary { ages } => {
            let store = open(dir, false)?;
            let now = now_ms();
            let nodes: Vec<_> = store
                .summaries(true, now)?
                .iter()
                .map(|(id, rec, s)| {
                    let mut n = report::node_info(id, rec, s, None, now);
                    if !ages {
                        n.ages.clear();
                    }
                    n
                })
                .collect();
            let format = store.format_version()?;
            let size = store.size_on_disk()?;
            let manager = store.manager_id()?.unwrap_or_default();
            let next_seq = store.persisted_next_seq()?;
            if json {
                report::write_json(
                    w,
                    &json!({
                        "data_dir": dir.display().to_string(),
                        "manager_id": manager,
                        "format": format,
                        "store_bytes": size,
                        "next_seq": next_seq,
                        "nodes": nodes.iter().map(report::node_json).collect::<Vec<_>>(),
                    }),
                )?;
            } else {
                writeln!(
                    w,
                    "store {} (format {format}, {size} bytes on disk), manager {}, next seq \
                     {next_seq}",
                    store.dir().display(),
                    if manager.is_empty() { "-" } else { &manager },
                )?;
                if nodes.is_empty() {
                    writeln!(w, "(no nodes known)")?;
                } else {
                    report::nodes_table(w, &nodes, *ages)?;
                }
            }
        }
        Cmd::Verify { repair } => {
            let store = open(dir, *repair)?;
            let r = store.verify(*repair)?;
            if json {
                report::write_json(
                    w,
                    &json!({
                        "records": r.records,
                        "quarantined": r.quarantined,
                        "ok": !r.has_unrepaired(),
                        "problems": r.problems.iter().map(|p| json!({
                            "key": p.key, "what": p.what, "repaired": p.repaired,
                        })).collect::<Vec<_>>(),
                        "notes": r.notes,
                    }),
                )?;
            } else {
                let fixed = r.problems.iter().filter(|p| p.repaired.is_some()).count();
                writeln!(
                    w,
                    "checked {} records ({} in quarantine): {} problem(s){}",
                    r.records,
                    r.quarantined,
                    r.problems.len(),
                    if *repair {
                        format!(", {fixed} repaired")
                    } else {
                        String::new()
                    }
                )?;
                if !r.problems.is_empty() {
                    let rows: Vec<Vec<String>> = r
                        .problems
                        .iter()
                        .map(|p| {
                            vec![
                                p.key.clone(),
                                p.repaired.clone().unwrap_or_else(|| "-".into()),
                                p.what.clone(),
                            ]
                        })
                        .collect();
                    report::table(w, &["KEY", "REPAIR", "PROBLEM"], &[], &rows)?;
                    if !repair {
                        writeln!(
                            w,
                            "run `queue-dump verify --repair` on the stopped store to repair"
                        )?;
                    }
                }
                for note in &r.notes {
                    writeln!(w, "note: {note}")?;
                }
            }
            if r.has_unrepaired() {
                return Ok(ExitCode::from(EXIT_PROBLEMS));
            }
        }
        Cmd::List(a) => {
            let store = open(dir, false)?;
            known_node(&store, &a.node)?;
            let kind = if a.dead_letter {
                QueueKind::DeadLetter
            } else {
                QueueKind::Live
            };
            let entries: Vec<_> = store
                .entries(&a.node, kind, &a.filter.filter(a.from), a.limit, now_ms())?
                .iter()
                .map(report::entry)
                .collect();
            report::entries(w, &entries, json)?;
        }
        Cmd::Show { msg_id, raw } => {
            let store = open(dir, false)?;
            show(&store, msg_id, *raw, json, w)?;
        }
        Cmd::Export {
            node,
            dead_letter,
            filter,
        } => {
            let store = open(dir, false)?;
            let kind = if *dead_letter {
                QueueKind::DeadLetter
            } else {
                QueueKind::Live
            };
            let nodes = match node {
                Some(n) => {
                    known_node(&store, n)?;
                    vec![n.clone()]
                }
                None => store
                    .summaries(false, now_ms())?
                    .into_iter()
                    .map(|(id, _, _)| id)
                    .collect(),
            };
            let (written, unreadable) = export(&store, &nodes, kind, filter, w)?;
            if std::io::stderr().is_terminal() {
                eprintln!("exported {written} entries");
            }
            if unreadable > 0 {
                w.flush()?;
                bail!(
                    "{unreadable} matching entries have no readable message and were not \
                     exported; run `queue-dump verify` to see them"
                );
            }
        }
        Cmd::Import { file, dry_run } => {
            let items = read_export(file)?;
            let store = open(dir, !dry_run)?;
            let out = store.import(items, *dry_run)?;
            if json {
                report::write_json(
                    w,
                    &json!({
                        "dry_run": dry_run,
                        "imported": out.imported,
                        "new_nodes": out.new_nodes,
                        "skipped": out.skipped.iter().map(|(i, why)| json!({
                            "node_id": i.node, "msg_id": i.message.msg_id, "reason": why,
                        })).collect::<Vec<_>>(),
                    }),
                )?;
            } else {
                let verb = if *dry_run { "would import" } else { "imported" };
                writeln!(w, "{verb} {} entries", out.imported)?;
                for (_, why) in &out.skipped {
                    writeln!(w, "skipped: {why}")?;
                }
                for n in &out.new_nodes {
                    writeln!(
                        w,
                        "node {n} was not known: created with no address; start the manager \
                         with --static-node {n}=HOST:PORT (or let it register in etcd)"
                    )?;
                }
            }
        }
        Cmd::Replay(a) => {
            let store = open(dir, !a.dry_run)?;
            known_node(&store, &a.node)?;
            let out =
                store.replay_dead_letters(&a.node, &a.filter.filter(None), a.dry_run, now_ms())?;
            report::replay(w, &a.node, &report::replay_reply(&out, a.dry_run), json)?;
        }
        Cmd::Purge(a) => {
            let store = open(dir, !a.dry_run)?;
            known_node(&store, &a.node)?;
            let kind = if a.dead_letter {
                QueueKind::DeadLetter
            } else {
                QueueKind::Live
            };
            let purged = store.purge(&a.node, kind, &a.filter.filter(None), a.dry_run, now_ms())?;
            if !a.dry_run && kind == QueueKind::Live && !purged.is_empty() {
                store.reclaim_payloads()?;
            }
            report::purge(
                w,
                &a.node,
                a.dead_letter,
                &report::purge_reply(&purged, a.dry_run),
                json,
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `show`: the message, then where it is held.
fn show(
    store: &Store,
    msg_id: &str,
    raw: bool,
    json: bool,
    w: &mut dyn Write,
) -> anyhow::Result<()> {
    let found = store.find_message(msg_id)?;
    let (held, unheld) = (found.held, found.delivered);
    let message = held
        .iter()
        .find_map(|e| e.message.clone())
        .or_else(|| unheld.first().map(|(_, m)| m.clone()))
        .ok_or_else(|| {
            anyhow!(
                "msg_id {msg_id:?} is not in this store (never accepted here, or delivered \
                 everywhere and reclaimed)"
            )
        })?;
    if raw {
        w.write_all(&message.payload)?;
        return Ok(());
    }
    let entries: Vec<_> = held.iter().map(report::entry).collect();
    if json {
        use base64::Engine as _;
        report::write_json(
            w,
            &json!({
                "msg_id": message.msg_id,
                "topic": message.topic,
                "headers": message.headers.iter().cloned().collect::<BTreeMap<_, _>>(),
                "accepted_at": report::rfc3339(message.accepted_at_ms),
                "expires_at": message.expires_at_ms().map(report::rfc3339),
                "ttl_ms": message.ttl_ms,
                "payload_bytes": message.payload.len(),
                "payload": base64::engine::general_purpose::STANDARD.encode(&message.payload),
                "held_by": entries.iter().map(report::entry_json).collect::<Vec<_>>(),
                "delivered_seqs": unheld.iter().map(|(s, _)| s).collect::<Vec<_>>(),
            }),
        )?;
        return Ok(());
    }
    writeln!(w, "msg_id:      {}", message.msg_id)?;
    writeln!(w, "topic:       {}", message.topic)?;
    writeln!(
        w,
        "accepted_at: {}",
        report::rfc3339(message.accepted_at_ms)
    )?;
    writeln!(
        w,
        "expires_at:  {}",
        message
            .expires_at_ms()
            .map_or("never".to_string(), report::rfc3339)
    )?;
    for (k, v) in &message.headers {
        writeln!(w, "header:      {k}={v}")?;
    }
    writeln!(w, "payload:     {} bytes", message.payload.len())?;
    let text = std::str::from_utf8(&message.payload)
        .ok()
        .filter(|t| t.chars().all(|c| !c.is_control() || c == '\n' || c == '\t'));
    match text {
        Some(t) => writeln!(w, "{t}")?,
        None => {
            for (i, chunk) in message.payload.chunks(16).enumerate() {
                let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                writeln!(w, "  {:08x}  {}", i * 16, hex.join(" "))?;
            }
        }
    }
    writeln!(w)?;
    if held.is_empty() {
        writeln!(
            w,
            "held by no node (delivered everywhere; not reclaimed yet)"
        )?;
    } else {
        writeln!(w, "held by:")?;
        let rows: Vec<Vec<String>> = held
            .iter()
            .map(|e| {
                vec![
                    e.node.clone(),
                    e.kind.label().to_string(),
                    e.seq.to_string(),
                    e.attempts.to_string(),
                    e.dead_reason.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        report::table(
            w,
            &["NODE", "QUEUE", "SEQ", "ATTEMPTS", "DEAD_REASON"],
            &["SEQ", "ATTEMPTS"],
            &rows,
        )?;
    }
    Ok(())
}

/// `export`: JSON lines, page by page so a long queue never sits in memory whole. Returns
/// (lines written, matching entries skipped for an unreadable message).
fn export(
    store: &Store,
    nodes: &[String],
    kind: QueueKind,
    filter: &FilterArgs,
    w: &mut dyn Write,
) -> anyhow::Result<(u64, u64)> {
    let progress = std::io::stderr().is_terminal();
    let now = now_ms();
    let (mut written, mut unreadable) = (0u64, 0u64);
    for node in nodes {
        let mut from = None;
        loop {
            let f: Filter = filter.filter(from);
            let page = store.entries(node, kind, &f, EXPORT_PAGE, now)?;
            for e in &page {
                match ExportRecord::from_entry(e) {
                    Some(r) => {
                        serde_json::to_writer(&mut *w, &r)?;
                        writeln!(w)?;
                        written += 1;
                        if progress && written % 10_000 == 0 {
                            eprint!("\rexported {written} entries...");
                        }
                    }
                    None => unreadable += 1,
                }
            }
            match page.last() {
                Some(last) if page.len() == EXPORT_PAGE => from = Some(last.seq + 1),
                _ => break,
            }
        }
    }
    if progress && written >= 10_000 {
        eprintln!();
    }
    Ok((written, unreadable))
}

/// Reads and checks a whole export file before anything is written.
fn read_export(file: &Path) -> anyhow::Result<Vec<push_manager::store::ImportItem>> {
    let reader: Box<dyn BufRead> = if file == Path::new("-") {
        Box::new(io::BufReader::new(io::stdin()))
    } else {
        let f = std::fs::File::open(file)
            .with_context(|| format!("cannot open export file {}", file.display()))?;
        Box::new(io::BufReader::new(f))
    };
    let mut items = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let item = ExportRecord::parse(&line).map_err(|e| {
            anyhow!(
                "{} line {}: {e}; nothing was imported (fix or remove the line)",
                file.display(),
                i + 1
            )
        })?;
        items.push(item);
    }
    Ok(items)
}
