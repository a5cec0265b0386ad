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
    let mut s = ProcStats {
        cpu_seconds: cpu_seconds_at(&format!("/proc/{pid}/stat")),
        ..ProcStats::default()
    };
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

/// User plus system CPU seconds in a `stat` file of `/proc` (0 if it cannot be read).
fn cpu_seconds_at(path: &str) -> f64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|stat| Some(cpu_seconds_of(parse_stat(&stat)?.1)))
        .unwrap_or(0.0)
}

/// A `stat` line's command name and the fields after it. The name (field 2) may contain
/// spaces and parentheses: it ends at the last ") ".
fn parse_stat(stat: &str) -> Option<(&str, Vec<&str>)> {
    let (head, rest) = stat.rsplit_once(") ")?;
    let (_, name) = head.split_once(" (")?;
    Some((name, rest.split_whitespace().collect()))
}

/// utime plus stime, fields 14 and 15 of the whole line: 11 and 12 after the name.
fn cpu_seconds_of(fields: Vec<&str>) -> f64 {
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / TICKS_PER_SECOND
}

/// CPU seconds the calling thread has used so far.
pub fn thread_cpu_seconds() -> f64 {
    cpu_seconds_at("/proc/thread-self/stat")
}

/// CPU seconds used so far by this process's live threads whose name starts with `prefix`.
/// A thread that has ended no longer counts, so a difference of two readings can only
/// understate what such threads used in between.
pub fn threads_cpu_seconds(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .filter_map(|stat| {
            let (name, fields) = parse_stat(&stat)?;
            name.starts_with(prefix).then(|| cpu_seconds_of(fields))
        })
        .sum()
}
