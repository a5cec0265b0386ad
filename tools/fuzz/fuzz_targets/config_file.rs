//! The `--config` TOML file: parsed and validated exactly as `push-manager serve` does
//! (`ServeArgs::resolve`), from a file holding the input. Errors are fine; panics are not.
#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use push_manager::config::ServeArgs;

fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!(
            "push-manager-fuzz-config-{}.toml",
            std::process::id()
        ))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = path();
    let written = std::fs::File::create(path).and_then(|mut f| f.write_all(data));
    if written.is_err() {
        return;
    }
    let args = ServeArgs {
        config: Some(path.clone()),
        ..ServeArgs::default()
    };
    let _ = args.resolve();
});
