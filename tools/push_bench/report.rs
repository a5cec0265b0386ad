//! The run's figures: one struct, printed as text for people or as one JSON object
//! (`--json`) for scripts and tests. Field names are what BENCHMARKS.md and
//! tests/bench_smoke.rs read: rename only together with them.

use std::io::Write;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency percentiles in ms, from a histogram of µs.
#[derive(Debug, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

impl Percentiles {
    /// The percentiles of `h` (µs), in ms.
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// The manager process's resource use over the run.
#[derive(Debug, Serialize)]
pub struct ManagerFigures {
    /// User + system CPU seconds from after start to the end of delivery.
    pub cpu_seconds: f64,
    /// Peak resident set size (VmHWM).
    pub peak_rss_kib: u64,
    /// Bytes the manager caused to be written to disk over the run.
    pub disk_write_bytes: u64,
    /// `disk_write_bytes` per broadcast (all nodes' queues and their deletion included).
    pub disk_bytes_per_broadcast: f64,
}

/// The floors of the same run and the product's figures as ratios to them.
#[derive(Debug, Serialize)]
pub struct Floors {
    /// Records (sled) and calls (echo) each floor sent.
    pub messages: usize,
    /// Raw sled group commit (insert, flush, fdatasync per round), records/s.
    pub sled_commit_per_s: f64,
    /// Disk bytes written per record by the sled floor (its write amplification).
    pub sled_disk_bytes_per_record: f64,
    /// The same, records packed into 16 KiB values as the store packs messages, records/s.
    pub sled_packed_per_s: f64,
    /// Disk bytes written per record by the packed sled floor.
    pub sled_packed_disk_bytes_per_record: f64,
    /// Unary gRPC calls/s to a server that answers OK at once.
    pub echo_per_s: f64,
    /// Messages/s in `BroadcastBatch` calls of 256 to the same server.
    pub echo_batch_per_s: f64,
    /// CPU µs per record of the sled floor's committer and sled's threads (callers excluded).
    pub sled_cpu_us_per_record: f64,
    /// The same for the packed sled floor.
    pub sled_packed_cpu_us_per_record: f64,
    /// CPU µs per unary echo call, both ends (callers and server).
    pub echo_cpu_us_per_call: f64,
    /// CPU µs per message of the batched echo floor, both ends.
    pub echo_batch_cpu_us_per_message: f64,
    /// The most acked/s this run's shape can reach on this machine's cores, from the CPU the
    /// floors need: each message costs at least its accept call (unary or batched echo), its
    /// packed sled record, and one echo message per node (unary or batched, as the nodes
    /// take them). A ceiling: the product's own work comes on top. `None` when the floors
    /// were too short to measure any CPU (Linux counts it in 10 ms ticks).
    pub ceiling_acked_per_s: Option<f64>,
    /// acked/s ÷ sled floor.
    pub acked_vs_sled: f64,
    /// acked/s ÷ packed sled floor.
    pub acked_vs_sled_packed: f64,
    /// acked/s ÷ echo floor.
    pub acked_vs_echo: f64,
    /// deliveries/s ÷ echo floor.
    pub deliveries_vs_echo: Option<f64>,
}

/// The backlog profile: nodes offline while everything is queued, then back.
#[derive(Debug, Serialize)]
pub struct Backlog {
    /// Messages queued while the nodes were offline.
    pub queued: u64,
    /// Manager RSS with everything queued (VmRSS).
    pub rss_queued_kib: u64,
    /// From the nodes' start to the first delivery (includes what is left of the manager's
    /// backoff toward the offline nodes).
    pub first_delivery_s: f64,
    /// From the first to the last delivery.
    pub drain_seconds: f64,
    /// Deliveries ÷ `drain_seconds`.
    pub drain_per_s: f64,
}

/// The restart profile: manager SIGKILLed with everything queued, restarted.
#[derive(Debug, Serialize)]
pub struct Restart {
    /// Messages queued when the manager was killed.
    pub queued: u64,
    /// Manager RSS with everything queued, before the kill (VmRSS).
    pub rss_queued_kib: u64,
    /// From the restart's spawn to health SERVING (polled every 50 ms).
    pub serving_s: f64,
    /// From the restart's spawn to the first delivery at a node (ms resolution).
    pub first_delivery_s: f64,
    /// The restarted manager's RSS once SERVING.
    pub rss_after_restart_kib: u64,
    /// Deliveries per second from the first to the last delivery after the restart.
    pub drain_per_s: f64,
}

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `--profile`, if given.
    pub profile: Option<String>,
    /// online, backlog or restart.
    pub mode: String,
    /// `--connect`: the running manager sent to (no sims started, delivery not tracked).
    pub connect: Option<String>,
    /// Connect-node-sims.
    pub nodes: usize,
    /// Whether the sims answered BroadcastBatch with UNIMPLEMENTED.
    pub unary_only_nodes: bool,
    /// Broadcasts sent.
    pub messages: usize,
    /// Payload bytes.
    pub size: usize,
    /// Callers (closed loop) or most calls in flight (open loop).
    pub concurrency: usize,
    /// gRPC connections.
    pub connections: usize,
    /// Items per call (1 = unary).
    pub batch: usize,
    /// Open-loop rate in messages/s, if any.
    pub rate: Option<f64>,
    /// The manager's durability mode.
    pub durability: String,
    /// Messages answered OK.
    pub acked: u64,
    /// Of those, answered `duplicate = true`.
    pub duplicates_acked: u64,
    /// Replies whose node_count was not the number of nodes.
    pub node_count_mismatches: u64,
    /// From the first call to the last answer.
    pub send_seconds: f64,
    /// acked ÷ send_seconds.
    pub acked_per_s: f64,
    /// Ack latency per message.
    pub ack_latency_ms: Percentiles,
    /// Distinct (message, node) deliveries seen in the sims' records.
    pub delivered: Option<u64>,
    /// Whether every node got every message.
    pub all_delivered: Option<bool>,
    /// Of `delivered`, how many came as items of `BroadcastBatch` calls.
    pub delivered_via_batch: Option<u64>,
    /// Of `delivered`, how many came as unary `Broadcast` calls.
    pub delivered_via_unary: Option<u64>,
    /// Deliveries of a message a node already had (at-least-once).
    pub redeliveries: Option<u64>,
    /// From the first call to the last first arrival at a node (online nodes only: with
    /// nodes offline on purpose see `backlog` / `restart`).
    pub deliver_seconds: Option<f64>,
    /// delivered ÷ deliver_seconds.
    pub deliveries_per_s: Option<f64>,
    /// From a message's call being sent to its arrival at a node (ms resolution).
    pub accept_to_node_ms: Option<Percentiles>,
    /// The manager's resource use.
    pub manager: Option<ManagerFigures>,
    /// `--floors`.
    pub floors: Option<Floors>,
    /// The backlog profile's figures.
    pub backlog: Option<Backlog>,
    /// The restart profile's figures.
    pub restart: Option<Restart>,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl Report {
    /// Writes the report to stdout: one JSON line, or text.
    pub fn print(&self, json: bool) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        if json {
            let text = serde_json::to_string(self).map_err(std::io::Error::other)?;
            writeln!(out, "{text}")?;
        } else {
            self.write_text(&mut out)?;
        }
        out.flush()
    }

    fn write_text(&self, out: &mut impl Write) -> std::io::Result<()> {
        let how = if self.batch > 1 {
            format!("batches of {}", self.batch)
        } else {
            "unary".to_string()
        };
        let load = match self.rate {
            Some(r) => format!(
                "at {r:.0} msgs/s (at most {} calls in flight)",
                self.concurrency
            ),
            None => format!("{} callers", self.concurrency),
        };
        let target = match &self.connect {
            Some(addr) => format!("the manager at {addr}"),
            None => format!(
                "{} {} nodes",
                self.nodes,
                if self.unary_only_nodes {
                    "unary-only"
                } else {
                    "batch-capable"
                }
            ),
        };
        let durability = match &self.connect {
            Some(_) => String::new(),
            None => format!(", {}", self.durability),
        };
        writeln!(
            out,
            "push-bench{}: {} x {} B to {target}, {how}, {load} over {} connections{durability}",
            self.profile
                .as_deref()
                .map(|p| format!(" {p}"))
                .unwrap_or_default(),
            self.messages,
            self.size,
            self.connections,
        )?;
        let a = &self.ack_latency_ms;
        writeln!(
            out,
            "  acked      {:>10.0} /s   ack p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
            self.acked_per_s, a.p50, a.p99, a.p999, a.max
        )?;
        if let Some(d) = self.deliveries_per_s {
            write!(
                out,
                "  delivered  {d:>10.0} /s   (messages x nodes, until every node had all)"
            )?;
            if let Some(l) = &self.accept_to_node_ms {
                write!(
                    out,
                    "  accept-to-node p50 {:.1} ms  p99 {:.1} ms",
                    l.p50, l.p99
                )?;
            }
            writeln!(out)?;
        }
        if let Some(m) = &self.manager {
            writeln!(
                out,
                "  manager    {:.2} CPU s, peak RSS {:.1} MiB, {:.0} disk bytes written per broadcast",
                m.cpu_seconds,
                mib(m.peak_rss_kib),
                m.disk_bytes_per_broadcast
            )?;
        }
        if let Some(f) = &self.floors {
            write!(
                out,
                "  floors     sled commit {:.0} /s ({:.0} disk B/record), packed {:.0} /s ({:.0} disk B/record), unary echo {:.0} /s ({} each): acked = {:.2} x sled, {:.2} x packed, {:.2} x echo",
                f.sled_commit_per_s,
                f.sled_disk_bytes_per_record,
                f.sled_packed_per_s,
                f.sled_packed_disk_bytes_per_record,
                f.echo_per_s,
                f.messages,
                f.acked_vs_sled,
                f.acked_vs_sled_packed,
                f.acked_vs_echo
            )?;
            if let Some(d) = f.deliveries_vs_echo {
                write!(out, "; delivered = {d:.2} x echo")?;
            }
            writeln!(out)?;
            write!(
                out,
                "  CPU        sled {:.1} us/record, packed {:.1}; echo {:.1} us/call, batched {:.1} us/message ({:.0} /s), both ends",
                f.sled_cpu_us_per_record,
                f.sled_packed_cpu_us_per_record,
                f.echo_cpu_us_per_call,
                f.echo_batch_cpu_us_per_message,
                f.echo_batch_per_s,
            )?;
            match f.ceiling_acked_per_s {
                Some(c) => writeln!(
                    out,
                    ": this shape can ack at most {c:.0} /s on these cores ({:.2} x echo)",
                    c / f.echo_per_s
                )?,
                None => writeln!(out, " (too short to bound acked/s)")?,
            }
        }
        if let Some(b) = &self.backlog {
            writeln!(
                out,
                "  backlog    {} queued, RSS {:.1} MiB; first delivery {:.2} s after the node came back; drain {:.0} msgs/s ({:.1} s)",
                b.queued,
                mib(b.rss_queued_kib),
                b.first_delivery_s,
                b.drain_per_s,
                b.drain_seconds
            )?;
        }
        if let Some(r) = &self.restart {
            writeln!(
                out,
                "  restart    {} queued, RSS {:.1} MiB; after SIGKILL: SERVING in {:.2} s, first delivery in {:.2} s (RSS {:.1} MiB); drain {:.0} msgs/s",
                r.queued,
                mib(r.rss_queued_kib),
                r.serving_s,
                r.first_delivery_s,
                mib(r.rss_after_restart_kib),
                r.drain_per_s
            )?;
        }
        match (self.all_delivered, self.delivered) {
            (Some(true), _) => writeln!(
                out,
                "  check      every node got all {} messages ({} in batches, {} unary; {} \
                 redeliveries, {} duplicate acks)",
                self.messages,
                self.delivered_via_batch.unwrap_or(0),
                self.delivered_via_unary.unwrap_or(0),
                self.redeliveries.unwrap_or(0),
                self.duplicates_acked
            )?,
            (Some(false), Some(d)) => writeln!(
                out,
                "  check      INCOMPLETE: {d} of {} deliveries",
                self.messages * self.nodes
            )?,
            _ => writeln!(out, "  check      delivery not tracked (--connect)")?,
        }
        Ok(())
    }
}
