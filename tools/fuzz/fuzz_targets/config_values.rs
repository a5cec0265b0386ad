//! The value parsers behind flags, env vars and the file: durations, sizes, node ids and
//! `host:port` addresses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use push_manager::config::{parse_duration, parse_size, validate_host_port, validate_node_id};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_duration(s);
    let _ = parse_size(s);
    let _ = validate_node_id(s);
    let _ = validate_host_port(s);
});
