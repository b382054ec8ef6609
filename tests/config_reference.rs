//! README.md's configuration reference (the table and the commented YAML example under
//! "Configuration") against the config structs: every key the server reads is in both, and
//! neither has a key the server does not read, so the reference cannot drift from the code.

use std::collections::BTreeSet;

use ortserve::config::Config;
use serde_yaml_ng::Value;

/// The first ```yaml block after the "## Configuration" heading.
fn reference() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme
        .find("\n## Configuration\n")
        .expect("a Configuration section")..];
    let start = section.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let end = start + section[start..].find("```").unwrap();
    section[start..end].to_string()
}

/// The keys of the reference table: the first column of the table whose header starts
/// `| key | type | default | env |`.
fn table_keys() -> BTreeSet<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find("\n## Configuration\n").unwrap()..];
    let table = &section[section
        .find("| key | type | default | env |")
        .expect("the table")..];
    table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.split('|')
                .nth(1)
                .unwrap()
                .trim()
                .trim_matches('`')
                .to_string()
        })
        .collect()
}

/// Every key path in `v` (`models[].batching.max_batch_size`), maps descended, lists of maps
/// descended as `[]`; a null, a scalar, a list of scalars or an empty map is a leaf.
fn paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Mapping(m) if !m.is_empty() => {
            for (k, child) in m {
                let k = k.as_str().unwrap_or_default();
                let p = if prefix.is_empty() {
                    k.to_string()
                } else {
                    format!("{prefix}.{k}")
                };
                paths(child, &p, out);
            }
        }
        Value::Sequence(items) if items.iter().any(Value::is_mapping) => {
            for item in items.iter().filter(|i| i.is_mapping()) {
                paths(item, &format!("{prefix}[]"), out);
            }
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

#[test]
fn the_readme_configuration_reference_lists_every_key_and_no_other() {
    let text = reference();
    // Parses with the server's own loader, which refuses unknown keys: no key in the
    // reference that the server does not read.
    let config = Config::from_yaml(&text).unwrap_or_else(|e| panic!("the reference: {e}"));
    let mut documented = BTreeSet::new();
    paths(
        &serde_yaml_ng::from_str(&text).unwrap(),
        "",
        &mut documented,
    );
    // Every key the structs have, as the server writes its config back out (`check-config`).
    let mut read = BTreeSet::new();
    paths(&serde_yaml_ng::to_value(&config).unwrap(), "", &mut read);
    // Keys of a form the reference shows in a comment (`auth: null  # {tokens_file: …}`, the
    // list form of `devices`) count when the comment names them.
    let in_comment = |p: &str| {
        ["server.auth.", "models[].devices[]."]
            .iter()
            .any(|section| p.starts_with(section))
            && p.rsplit('.')
                .next()
                .is_some_and(|key| text.contains(&format!("{key}:")))
    };
    let missing: Vec<_> = read
        .difference(&documented)
        .filter(|p| !in_comment(p))
        .collect();
    assert!(
        missing.is_empty(),
        "keys the server reads that README.md's configuration reference does not list: {missing:?}"
    );

    // The table: the same keys, the list form of `devices` and the fields of `auth` being
    // described in their rows.
    let table = table_keys();
    let expected: BTreeSet<String> = read
        .iter()
        .filter(|p| !p.starts_with("server.auth.") && !p.starts_with("models[].devices[]."))
        .cloned()
        .chain(["server.auth".to_string(), "models[].devices".to_string()])
        .collect();
    assert_eq!(
        table.difference(&expected).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "keys in README.md's table that the server does not read"
    );
    assert_eq!(
        expected.difference(&table).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "keys the server reads that README.md's table does not list"
    );
}

/// The example is a config `serve` would start with, not only keys that parse: `check-config`
/// (which opens the model and checks the `image` and `classification` sections against it)
/// accepts it, saved as a file in `config/` as its relative paths expect.
#[test]
fn the_readme_example_passes_check_config() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::os::unix::fs::symlink(root.join(".ortserve"), dir.path().join(".ortserve")).unwrap();
    let file = dir.path().join("config/example.yaml");
    std::fs::write(&file, reference()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ortserve"))
        .args(["check-config", "--config", file.to_str().unwrap()])
        .env_remove("ORT_DYLIB_PATH")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
