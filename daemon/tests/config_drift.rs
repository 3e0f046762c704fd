//! Drift guard: every config key the code knows is documented in `docs/config.md` and present
//! in the shipped `etc/llmd.toml`; the shipped file parses to the built-in defaults; the docs
//! list no key the code does not know; every environment variable is documented.

use std::collections::BTreeSet;
use std::path::Path;

use llmd_daemon::config::{self, Config, ModelConfig};
use llmd_options::{DtypeChoice, ReasoningParser};

fn repo(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// A config with every optional key set, so serialization shows all of them.
fn full_config() -> Config {
    let mut c = Config::default();
    c.server.api_key_file = Some("/etc/llmd/api-keys".into());
    c.models.push(ModelConfig {
        source: "hf:org/name".into(),
        name: Some("n".into()),
        tp: Some(1),
        max_model_len: Some(1),
        dtype: Some(DtypeChoice::Auto),
        gpus: Some(vec![0]),
        reasoning_parser: Some(ReasoningParser::None),
    });
    c
}

/// Dotted keys (`server.listen`, `models.source`) of a serialized config.
fn code_keys() -> BTreeSet<String> {
    let value = toml::Value::try_from(full_config()).unwrap();
    let mut keys = BTreeSet::new();
    for (section, v) in value.as_table().unwrap() {
        let tables: Vec<&toml::Table> = match v {
            toml::Value::Table(t) => vec![t],
            toml::Value::Array(a) => a.iter().filter_map(|x| x.as_table()).collect(),
            _ => panic!("top-level key `{section}` is not a table"),
        };
        for t in tables {
            for k in t.keys() {
                keys.insert(format!("{section}.{k}"));
            }
        }
    }
    keys
}

#[test]
fn shipped_file_parses_to_defaults() {
    let text = repo("etc/llmd.toml");
    let parsed = config::parse(&text, Path::new("etc/llmd.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed, Config::default(), "etc/llmd.toml must show the built-in defaults");
}

#[test]
fn every_key_is_documented_and_shipped() {
    let docs = repo("docs/config.md");
    let shipped = repo("etc/llmd.toml");
    let keys = code_keys();
    assert!(keys.len() > 30, "expected every key, got {keys:?}");
    for key in &keys {
        assert!(docs.contains(&format!("| `{key}` |")), "docs/config.md has no row for `{key}`");
        let (section, leaf) = key.split_once('.').unwrap();
        let header = if section == "models" { "[[models]]".to_string() } else { format!("[{section}]") };
        let start = shipped.find(&header).unwrap_or_else(|| panic!("etc/llmd.toml has no {header}"));
        let after = &shipped[start..];
        let present = after.lines().any(|l| {
            let l = l.trim_start_matches(['#', ' ']);
            l.starts_with(&format!("{leaf} ="))
        });
        assert!(present, "etc/llmd.toml does not show `{leaf}` under {header}");
    }
}

#[test]
fn docs_list_no_unknown_keys() {
    let docs = repo("docs/config.md");
    let keys = code_keys();
    for line in docs.lines().filter(|l| l.starts_with("| `")) {
        let cell = line.trim_start_matches("| `").split('`').next().unwrap();
        let is_config_key =
            ["server.", "control.", "storage.", "engine.", "log.", "models."].iter().any(|p| cell.starts_with(p));
        if is_config_key {
            assert!(keys.contains(cell), "docs/config.md documents `{cell}`, which the code does not know");
        }
    }
}

#[test]
fn every_environment_variable_is_documented() {
    let docs = repo("docs/config.md");
    for (name, _) in llmd_daemon::env::VARS {
        assert!(docs.contains(&format!("| `{name}` |")), "docs/config.md does not document {name}");
    }
}
