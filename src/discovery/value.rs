//! Registration keys and values (CONTRACT.md section 3).
//!
//! A connect-node registers `<prefix><node_id>`; the node id is the key's suffix and follows
//! the node id rules ([`crate::config::validate_node_id`]: visible ASCII, no `/`). The value
//! is either a plain `host:port`, or the JSON etcd's Go `naming/endpoints` package writes:
//!
//! ```text
//! 127.0.0.1:7001
//! {"Op":0,"Addr":"127.0.0.1:7001","Metadata":{"zone":"a"}}
//! ```
//!
//! In the JSON, `Op` 0 (Add, also when absent) is a registration; `Op` 1 (Delete) means the
//! endpoint is gone, like a deleted key. `Metadata` may be anything and is ignored.

use serde::Deserialize;

use crate::config::{validate_host_port, validate_node_id};

/// How a registration value is written (`connect-node-sim --etcd-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ValueFormat {
    /// A plain `host:port`.
    Plain,
    /// etcd naming JSON: `{"Op":0,"Addr":"host:port","Metadata":null}`.
    Naming,
}

/// What a registration value says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// The endpoint is at this `host:port`.
    At(String),
    /// A naming JSON `Delete` update: treated like a deleted key.
    Gone,
}

/// etcd's `naming/endpoints.Update`, as JSON.
#[derive(Deserialize)]
struct NamingUpdate {
    #[serde(rename = "Op", default)]
    op: i64,
    #[serde(rename = "Addr")]
    addr: String,
    // Anything, ignored; named so that a value with only Metadata still parses.
    #[serde(rename = "Metadata", default)]
    _metadata: serde_json::Value,
}

/// The value a node at `addr` registers, in `format`.
pub fn encode(format: ValueFormat, addr: &str) -> String {
    match format {
        ValueFormat::Plain => addr.to_string(),
        ValueFormat::Naming => {
            serde_json::json!({"Op": 0, "Addr": addr, "Metadata": null}).to_string()
        }
    }
}

/// Parses a registration value; the error says what is wrong, for a log line.
pub fn parse(value: &[u8]) -> Result<Registered, String> {
    let text = std::str::from_utf8(value).map_err(|_| "the value is not UTF-8".to_string())?;
    let text = text.trim();
    if text.starts_with('{') {
        let update: NamingUpdate = serde_json::from_str(text)
            .map_err(|e| format!("JSON that is not an etcd naming update ({e})"))?;
        return match update.op {
            0 => validate_host_port(&update.addr)
                .map(|()| Registered::At(update.addr))
                .map_err(|e| format!("naming JSON with a bad Addr: {e}")),
            1 => Ok(Registered::Gone),
            op => Err(format!(
                "naming JSON with unknown Op {op} (0 = Add, 1 = Delete)"
            )),
        };
    }
    validate_host_port(text)
        .map(|()| Registered::At(text.to_string()))
        .map_err(|e| format!("neither host:port nor etcd naming JSON: {e}"))
}

/// The node id of `key` under `prefix`, checked like any node id.
pub fn node_id<'k>(prefix: &str, key: &'k [u8]) -> Result<&'k str, String> {
    let key = std::str::from_utf8(key).map_err(|_| "the key is not UTF-8".to_string())?;
    let id = key
        .strip_prefix(prefix)
        .ok_or_else(|| format!("the key is not under {prefix}"))?;
    validate_node_id(id).map_err(|e| format!("bad node id {id:?}: {e}"))?;
    Ok(id)
}

/// A key made printable for logs.
pub fn show_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_parse() {
        let at = |a: &str| Ok(Registered::At(a.to_string()));
        assert_eq!(parse(b"127.0.0.1:7001"), at("127.0.0.1:7001"));
        assert_eq!(parse(b" node-a.local:80\n"), at("node-a.local:80"));
        assert_eq!(parse(b"[::1]:7001"), at("[::1]:7001"));
        assert_eq!(
            parse(br#"{"Op":0,"Addr":"127.0.0.1:7002","Metadata":{"zone":"a","w":[1,2]}}"#),
            at("127.0.0.1:7002")
        );
        assert_eq!(parse(br#"{"Addr":"h:1"}"#), at("h:1"));
        assert_eq!(
            parse(br#"{"Op":0,"Addr":"h:1","Metadata":null}"#),
            at("h:1")
        );
        assert_eq!(
            parse(br#"{"Op":1,"Addr":"h:1"}"#),
            Ok(Registered::Gone),
            "a Delete update"
        );
        for f in [ValueFormat::Plain, ValueFormat::Naming] {
            assert_eq!(parse(encode(f, "10.0.0.1:9").as_bytes()), at("10.0.0.1:9"));
        }
    }

    #[test]
    fn bad_values_say_why() {
        for (value, why) in [
            (&b""[..], "neither host:port"),
            (b"localhost", "no port"),
            (b"http://h:1", "scheme"),
            (b"\xff\xfe", "UTF-8"),
            (b"{not json", "not an etcd naming update"),
            (br#"{"Op":0}"#, "not an etcd naming update"),
            (br#"{"Op":0,"Addr":"nohost"}"#, "bad Addr"),
            (br#"{"Op":2,"Addr":"h:1"}"#, "unknown Op 2"),
        ] {
            let e = parse(value).expect_err("bad value");
            assert!(e.contains(why), "{value:?}: {e}");
        }
    }

    #[test]
    fn node_ids_come_from_the_key() {
        let p = "/services/connect-node/";
        assert_eq!(node_id(p, b"/services/connect-node/a-1"), Ok("a-1"));
        assert!(node_id(p, b"/services/connect-node/").is_err());
        assert!(node_id(p, b"/services/connect-node/a/b").is_err());
        assert!(node_id(p, b"/other/a").is_err());
    }
}
