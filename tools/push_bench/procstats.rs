//! The manager's resource use, read from `/proc/<pid>/{stat,status,io}` (Linux only; a file
//! that cannot be read gives zeros rather than failing the run, since the figures are
//! secondary to the throughput ones).

/// One sample of a process's counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcStats {
    /// User plus system CPU time since the process started.
    pub cpu_seconds: f64,
    /// Resident set size now (`VmRSS`).
    pub rss_kib: u64,
    /// Peak resident set size since the process started (`VmHWM`).
    pub peak_rss_kib: u64,
    /// Bytes the process caused to be sent to storage (`write_bytes`: counted when pages are
    /// dirtied, so it includes what is still in the page cache).
    pub write_bytes: u64,
}

/// Clock ticks per second for `utime`/`stime`. Linux reports them in USER_HZ, which is 100
/// on every architecture Rust targets; asking sysconf would need unsafe code.
const TICKS_PER_SECOND: f64 = 100.0;

/// Samples `pid`'s counters.
pub fn sample(pid: u32) -> ProcStats {
    let mut s = ProcStats::default();
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The command name (field 2) may contain spaces and parentheses: fields are counted
        // after its closing ") ".
        if let Some((_, rest)) = stat.rsplit_once(") ") {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
            s.cpu_seconds = (ticks(11) + ticks(12)) / TICKS_PER_SECOND;
        }
    }
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
        let kib = |v: &str| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("VmHWM:") {
                s.peak_rss_kib = kib(v);
            } else if let Some(v) = line.strip_prefix("VmRSS:") {
                s.rss_kib = kib(v);
            }
        }
    }
    if let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) {
        for line in io.lines() {
            if let Some(v) = line.strip_prefix("write_bytes:") {
                s.write_bytes = v.trim().parse().unwrap_or(0);
            }
        }
    }
    s
}
