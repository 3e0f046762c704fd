//! The daemon's config loader (`llmd_daemon::config::Settings::load`) on a file holding the
//! fuzz bytes, with an empty environment. It must answer Ok or a typed error, never panic;
//! and a config it accepts must print (`--print-config`) as TOML that parses again.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use llmd_daemon::config::{ConfigSource, Settings, parse};
use llmd_daemon::env::Env;

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::NamedTempFile::new().expect("temp config");
    file.write_all(data).expect("write config");
    let env = Env::from_lookup(|_| None);
    let source = ConfigSource::Explicit(file.path().to_path_buf());
    for dev in [false, true] {
        match Settings::load(&source, dev, &env) {
            Ok(settings) => {
                let printed = settings.to_toml();
                if let Err(e) = parse(&printed, file.path()) {
                    panic!("--print-config output does not parse again: {e}\n{printed}");
                }
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
            }
        }
    }
});
