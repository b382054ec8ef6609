use std::path::{Path, PathBuf};

use super::*;

/// The workspace root (fixtures, the bundled configs and the ONNX Runtime setup live there).
const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn fixture(name: &str) -> String {
    format!("{WORKSPACE}/tests/fixtures/{name}")
}

fn parse_ok(yaml: &str) -> Config {
    let c = Config::from_yaml(yaml).expect("parses");
    c.validate().expect("valid");
    c
}

fn error_of(yaml: &str) -> String {
    match Config::from_yaml(yaml) {
        Err(e) => e.to_string(),
        Ok(c) => c.validate().expect_err("should be invalid").to_string(),
    }
}

#[test]
fn every_shipped_config_loads_and_validates() {
    let dir = Path::new(WORKSPACE).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            if path.file_name().is_some_and(|n| n == "container.yaml") {
                // Written for the image tree (config/ beside models/): in .ortserve/, lib/ is
                // such a folder beside models/.
                let mut c = Config::from_yaml(&std::fs::read_to_string(&path).unwrap()).unwrap();
                c.resolve_paths(&Path::new(WORKSPACE).join(".ortserve/lib"));
                c.validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            } else {
                Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "expected the shipped configs in {}",
        dir.display()
    );
}

#[test]
fn defaults_fill_a_minimal_file() {
    let c = parse_ok(&format!(
        "models: [{{name: m, path: {}}}]",
        fixture("mlp.onnx")
    ));
    assert_eq!(c.server.http_addr, "0.0.0.0:8080");
    assert_eq!(c.server.max_body_bytes, ByteSize(16 << 20));
    let m = &c.models[0];
    assert_eq!(m.devices, Devices::default());
    assert_eq!(m.dispatch, DispatchPolicy::LeastLoaded);
    assert_eq!(
        m.batching.max_queue_delay.0,
        std::time::Duration::from_millis(2)
    );
    assert_eq!(m.version, "1");
}

#[test]
fn device_forms() {
    let c = parse_ok(&format!(
        "models: [{{name: m, path: {}, devices: [cpu:0, {{device: 'cpu:1', intra_op_threads: 1}}]}}]",
        fixture("mlp.onnx")
    ));
    assert_eq!(
        c.models[0].devices.0,
        vec![
            DeviceEntry {
                device: DeviceSpec::One(ProviderKind::Cpu, 0),
                intra_op_threads: None
            },
            DeviceEntry {
                device: DeviceSpec::One(ProviderKind::Cpu, 1),
                intra_op_threads: Some(1)
            },
        ]
    );
    for (s, d) in [
        ("auto", DeviceSpec::Auto),
        ("cpu", DeviceSpec::One(ProviderKind::Cpu, 0)),
        ("cuda:3", DeviceSpec::One(ProviderKind::Cuda, 3)),
        ("cuda:*", DeviceSpec::All(ProviderKind::Cuda)),
    ] {
        assert_eq!(s.parse::<DeviceSpec>().unwrap(), d);
    }
    assert!("gpu:0".parse::<DeviceSpec>().is_err());
    assert!("cuda:x".parse::<DeviceSpec>().is_err());
    assert!("cpu:*".parse::<DeviceSpec>().is_err());
    assert_eq!(
        "gpu:0".parse::<DeviceSpec>().unwrap_err(),
        "\"gpu:0\" is not a device; use auto, cpu, cpu:N, cuda:N or cuda:*"
    );
    for s in ["auto", "cpu:0", "cpu:3", "cuda:0", "cuda:*"] {
        assert_eq!(s.parse::<DeviceSpec>().unwrap().to_string(), s);
    }
}

#[test]
fn unknown_keys_are_rejected_with_their_path() {
    let e = error_of(&format!(
        "models: [{{name: m, path: {}, batching: {{max_batch: 4}}}}]",
        fixture("mlp.onnx")
    ));
    assert!(
        e.contains("models[0].batching") && e.contains("max_batch"),
        "{e}"
    );
    let e = error_of("server: {port: 1}\nmodels: []");
    assert!(e.contains("server") && e.contains("port"), "{e}");
}

#[test]
fn invalid_values_name_the_key() {
    let mlp = fixture("mlp.onnx");
    let cases = [
        (format!("models: [{{name: m, path: {mlp}, batching: {{max_batch_size: 0}}}}]"), "models[0].batching.max_batch_size"),
        (format!("models: [{{name: m, path: {mlp}, batching: {{queue_capacity: 0}}}}]"), "models[0].batching.queue_capacity"),
        (format!("models: [{{name: 'a b', path: {mlp}}}]"), "models[0].name"),
        (format!("models: [{{name: m, path: {mlp}}}, {{name: m, path: {mlp}}}]"), "models[1].name"),
        ("models: [{name: m, path: /nonexistent.onnx}]".to_string(), "models[0].path"),
        (format!("models: [{{name: m, path: {mlp}, devices: [cpu, cpu]}}]"), "models[0].devices[1]"),
        (format!("models: [{{name: m, path: {mlp}, devices: [auto, cpu:1]}}]"), "models[0].devices[0]"),
        (format!("models: [{{name: m, path: {mlp}, devices: [{{device: cpu, intra_op_threads: 0}}]}}]"), "models[0].devices[0].intra_op_threads"),
        (format!("models: [{{name: m, path: {mlp}, instances_per_device: 0}}]"), "models[0].instances_per_device"),
        (format!("server: {{http_addr: nowhere}}\nmodels: [{{name: m, path: {mlp}}}]"), "server.http_addr"),
        (format!("server: {{model_control: poll, poll_interval: 10ms}}\nmodels: [{{name: m, path: {mlp}}}]"), "server.poll_interval"),
        (format!("runtime: {{cpu_threads: 0}}\nmodels: [{{name: m, path: {mlp}}}]"), "runtime.cpu_threads"),
        ("models: []".to_string(), "models"),
    ];
    for (yaml, key) in cases {
        let e = error_of(&yaml);
        assert!(
            e.starts_with(key),
            "{yaml}\n=> {e}\n(expected the key {key})"
        );
    }
    for (yaml, needle) in [
        (
            format!("models: [{{name: m, path: {mlp}, devices: gpu:0}}]"),
            "models[0].devices",
        ),
        (
            format!("models: [{{name: m, path: {mlp}, batching: {{max_queue_delay: soon}}}}]"),
            "models[0].batching.max_queue_delay",
        ),
        (
            format!("server: {{max_body_bytes: 12 parsecs}}\nmodels: [{{name: m, path: {mlp}}}]"),
            "server.max_body_bytes",
        ),
        (
            format!("models: [{{name: m, path: {mlp}, dispatch: random}}]"),
            "models[0].dispatch",
        ),
        (
            format!("server: {{model_control: sometimes}}\nmodels: [{{name: m, path: {mlp}}}]"),
            "server.model_control",
        ),
    ] {
        let e = error_of(&yaml);
        assert!(e.contains(needle), "{yaml}\n=> {e}");
    }
}

#[test]
fn env_overrides_and_relative_paths() {
    // Issue 26, defect 4: a value that cannot be used is an error naming the variable; it was
    // ignored (ORTSERVE_LOG_FORMAT) or reported as the file's key (ORTSERVE_HTTP_ADDR).
    for (var, value) in [
        ("ORTSERVE_LOG_FORMAT", "xml"),
        ("ORTSERVE_HTTP_ADDR", "bogus"),
        ("ORTSERVE_ADMIN_ADDR", "nowhere:x"),
    ] {
        let mut c = Config::from_yaml("models: []").unwrap();
        let e = c
            .apply_env(|k| (k == var).then(|| PathBuf::from(value)))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("{var}: ")) && e.contains(value),
            "{e}"
        );
    }
    {
        use std::os::unix::ffi::OsStrExt;
        let mut c = Config::from_yaml("models: []").unwrap();
        let e = c
            .apply_env(|k| {
                (k == "ORTSERVE_LOG_FORMAT")
                    .then(|| PathBuf::from(std::ffi::OsStr::from_bytes(b"js\xffon")))
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("ORTSERVE_LOG_FORMAT: is not UTF-8"), "{e}");
    }

    let mut c = Config::from_yaml(
        "models: [{name: m, path: m.onnx}]\nruntime: {onnxruntime_path: lib/x.so}",
    )
    .unwrap();
    c.apply_env(|k| match k {
        "ORTSERVE_HTTP_ADDR" => Some(PathBuf::from("127.0.0.1:9000")),
        "ORTSERVE_LOG_FORMAT" => Some(PathBuf::from("json")),
        "ORT_DYLIB_PATH" => Some(PathBuf::from("/opt/ort.so")),
        _ => None,
    })
    .unwrap();
    c.resolve_paths(Path::new("/etc/ortserve"));
    assert_eq!(c.server.http_addr, "127.0.0.1:9000");
    assert_eq!(c.server.log_format, LogFormat::Json);
    assert_eq!(c.runtime.dylib_env, Some(PathBuf::from("/opt/ort.so")));
    assert_eq!(
        c.runtime.onnxruntime_path,
        Some(PathBuf::from("/etc/ortserve/lib/x.so"))
    );
    assert_eq!(c.models[0].path, PathBuf::from("/etc/ortserve/m.onnx"));
}

/// A folder laid out like KServe's `/mnt/models`: `files` are (path, content), where content
/// `MLP` copies the MLP fixture.
fn model_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, content) in files {
        let to = dir.path().join(path);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        if *content == "MLP" {
            std::fs::copy(fixture("mlp.onnx"), &to).unwrap();
        } else {
            std::fs::write(&to, content).unwrap();
        }
    }
    dir
}

#[test]
fn a_model_dir_with_one_file_is_one_model() {
    let dir = model_dir(&[("mlp.onnx", "MLP"), ("labels.txt", "a\nb\nc\n")]);
    let named = models_in_dir(dir.path(), Some("classifier")).unwrap();
    assert_eq!(named.len(), 1);
    assert_eq!(named[0].name, "classifier");
    assert_eq!(named[0].path, dir.path().join("mlp.onnx"));
    let labels = named[0].classification.as_ref().unwrap().labels.as_ref();
    assert_eq!(labels, Some(&dir.path().join("labels.txt")));
    // Without a name, the file's stem.
    assert_eq!(models_in_dir(dir.path(), None).unwrap()[0].name, "mlp");
}

#[test]
fn a_model_dir_repository_has_a_model_per_folder_with_its_settings() {
    let dir = model_dir(&[
        ("a/model.onnx", "MLP"),
        (
            "a/ortserve.yaml",
            "devices: cpu\nbatching: {max_batch_size: 4}\ntuning: {cache_dir: cache}\n",
        ),
        ("b/model.onnx", "MLP"),
        ("b/labels.txt", "x\ny\nz\n"),
        ("b/ortserve.yaml", "classification: {top_k: 2}\n"),
        ("notes/readme.txt", "not a model"),
    ]);
    let all = models_in_dir(dir.path(), None).unwrap();
    let names: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(matches!(all[0].batching.max_batch_size, MaxBatch::Fixed(4)));
    assert_eq!(all[0].tuning.cache_dir, Some(dir.path().join("a/cache")));
    let b = all[1].classification.as_ref().unwrap();
    assert_eq!(
        (b.top_k, b.labels.clone()),
        (2, Some(dir.path().join("b/labels.txt")))
    );
    // --model-name picks one.
    let one = models_in_dir(dir.path(), Some("b")).unwrap();
    assert_eq!((one.len(), one[0].name.as_str()), (1, "b"));
    let err = models_in_dir(dir.path(), Some("c"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no model named \"c\"") && err.contains("a, b"),
        "{err}"
    );
}

#[test]
fn bad_model_dirs_say_which_file_and_what() {
    let empty = model_dir(&[]);
    let err = models_in_dir(empty.path(), None).unwrap_err().to_string();
    assert!(err.contains("no model"), "{err}");

    let two = model_dir(&[("a.onnx", "MLP"), ("b.onnx", "MLP")]);
    let err = models_in_dir(two.path(), Some("m"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 .onnx files (a.onnx, b.onnx)"), "{err}");

    let both = model_dir(&[("a.onnx", "MLP"), ("m/model.onnx", "MLP")]);
    let err = models_in_dir(both.path(), None).unwrap_err().to_string();
    assert!(err.contains("keep one layout"), "{err}");

    let bad_key = model_dir(&[
        ("m/model.onnx", "MLP"),
        ("m/ortserve.yaml", "batching: {max_batch: 4}\n"),
    ]);
    let err = models_in_dir(bad_key.path(), None).unwrap_err().to_string();
    let file = bad_key.path().join("m/ortserve.yaml");
    assert!(
        err.starts_with(&format!("{}: batching", file.display())) && err.contains("max_batch"),
        "{err}"
    );

    let named = model_dir(&[
        ("m/model.onnx", "MLP"),
        ("m/ortserve.yaml", "name: other\n"),
    ]);
    let err = models_in_dir(named.path(), None).unwrap_err().to_string();
    assert!(err.contains("name: comes from the folder"), "{err}");
}

#[test]
fn serve_takes_a_model_dir_alone_or_on_top_of_a_config_file() {
    let dir = model_dir(&[("m/model.onnx", "MLP")]);
    let c = Config::for_serve(None, Some(dir.path()), None, Some(9123), None).unwrap();
    assert_eq!(c.server.http_addr, "0.0.0.0:9123");
    assert_eq!(c.models.len(), 1);

    let file = dir.path().join("config.yaml");
    std::fs::write(
        &file,
        format!(
            "server: {{http_addr: '127.0.0.1:8000'}}\nmodels: [{{name: m, path: {}}}]\n",
            fixture("mlp.onnx")
        ),
    )
    .unwrap();
    let err = Config::for_serve(Some(&file), Some(dir.path()), None, None, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"m\" is both in the config file and in"),
        "{err}"
    );
    std::fs::write(
        &file,
        format!(
            "server: {{http_addr: '127.0.0.1:8000'}}\nmodels: [{{name: other, path: {}}}]\n",
            fixture("mlp.onnx")
        ),
    )
    .unwrap();
    let c = Config::for_serve(Some(&file), Some(dir.path()), None, Some(9124), Some(9125)).unwrap();
    assert_eq!(c.server.http_addr, "127.0.0.1:9124");
    // --grpc-port keeps the gRPC address's host (the default's, 0.0.0.0, here).
    assert_eq!(c.server.grpc_addr.as_deref(), Some("0.0.0.0:9125"));
    let names: Vec<&str> = c.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["other", "m"]);
}

#[test]
fn buckets_are_powers_of_two_up_to_the_batch_size_and_auto_is_on_only_on_cuda() {
    assert_eq!(Buckets::Auto.sizes(8, false), Vec::<usize>::new());
    assert_eq!(Buckets::Auto.sizes(8, true), [1, 2, 4, 8]);
    assert_eq!(Buckets::On.sizes(12, false), [1, 2, 4, 8, 12]);
    assert_eq!(Buckets::On.sizes(1, false), [1]);
    assert_eq!(Buckets::Off.sizes(64, true), Vec::<usize>::new());
    let c = parse_ok(&format!(
        "models: [{{name: m, path: {}, batching: {{buckets: on}}}}]",
        fixture("mlp.onnx")
    ));
    assert_eq!(c.models[0].batching.buckets, Buckets::On);
    assert!(error_of(&format!(
        "models: [{{name: m, path: {}, batching: {{buckets: sometimes}}}}]",
        fixture("mlp.onnx")
    ))
    .contains("batching.buckets"));
}

/// Issue 26, defect 4: a bad `auto`-or-number value was "data did not match any variant of
/// untagged enum" at the line of the map that holds it (line 4 for a value on line 5); now the
/// message says what is expected, at the value's own line.
#[test]
fn auto_or_number_errors_name_the_value_and_its_line() {
    let e = Config::from_yaml(
        "server: {drain_delay: 1s}\nmodels:\n  - name: m\n    batching:\n      max_batch_size: banana\n    path: m.onnx\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("models[0].batching.max_batch_size")
            && e.contains("expected `auto` or a number, got \"banana\"")
            && e.contains("line 5"),
        "{e}"
    );
    let e = Config::from_yaml("runtime:\n  cpu_threads: -2\nmodels: []\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("runtime.cpu_threads") && e.contains("line 2"),
        "{e}"
    );
    let c = Config::from_yaml(
        "runtime: {cpu_threads: 3}\nmodels: [{name: m, path: m.onnx, batching: {max_batch_size: auto}}]",
    )
    .unwrap();
    assert_eq!(c.runtime.cpu_threads, Threads::Count(3));
    assert_eq!(c.models[0].batching.max_batch_size, MaxBatch::Auto);
}

/// `runtime.preprocess_threads: 0` was taken silently (the pool ran one thread); it is a config
/// error like `cpu_threads: 0`.
#[test]
fn no_preprocessing_threads_is_an_error() {
    let c = Config::from_yaml("runtime: {preprocess_threads: 0}\nmodels: []").unwrap();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.starts_with("runtime.preprocess_threads: "), "{e}");
}

#[test]
fn version_policies_parse_choose_and_refuse_what_does_not_apply() {
    let dir = tempfile::tempdir().unwrap();
    let versioned = dir.path().join("m");
    std::fs::create_dir_all(versioned.join("1")).unwrap();
    let with = |policy: &str| {
        format!(
            "models:\n  - {{name: m, path: {}, version_policy: {policy}}}",
            versioned.display()
        )
    };
    let present = [3, 1, 10, 2];
    for (policy, want) in [
        ("{latest: 1}", vec![10]),
        ("{latest: 2}", vec![3, 10]),
        ("{latest: 9}", vec![1, 2, 3, 10]),
        ("all", vec![1, 2, 3, 10]),
        ("{specific: [2, 10, 77]}", vec![2, 10]),
    ] {
        let c = parse_ok(&with(policy));
        let p = c.models[0].version_policy.clone().unwrap();
        assert_eq!(p.choose(&present), want, "{policy}");
        // It writes back as it reads.
        let again: VersionPolicy =
            serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&p).unwrap()).unwrap();
        assert_eq!(again, p);
    }
    assert_eq!(VersionPolicy::default().choose(&present), vec![10]);
    for (policy, says) in [
        ("{latest: 0}", "version_policy.latest: must be at least 1"),
        ("newest", "expected `all`, `{latest: N}`"),
        ("{oldest: 1}", "the key \"oldest\""),
        ("{latest: 1, all: 1}", "expected one of"),
        ("{latest: -1}", "version_policy"),
    ] {
        let e = error_of(&with(policy));
        assert!(e.contains(says), "{policy}: {e}");
    }
    let e = error_of(&format!(
        "models:\n  - {{name: m, path: {}, version_policy: all}}",
        fixture("mlp.onnx")
    ));
    assert!(
        e.contains("models[0].version_policy: applies to a versioned folder"),
        "{e}"
    );
    assert!(error_of("models:\n  - {name: m, path: /nope, swap: both}").contains("swap"));
}

#[test]
fn a_config_that_is_not_a_plain_file_or_is_huge_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("config.yaml");
    std::fs::create_dir(&folder).unwrap();
    let e = Config::load(&folder).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let big = dir.path().join("big.yaml");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(MAX_CONFIG_BYTES + 1).unwrap();
    let e = Config::load(&big).unwrap_err().to_string();
    assert!(e.contains("more than the"), "{e}");
    // A FIFO is refused without a read that would wait for a writer.
    let fifo = dir.path().join("fifo.yaml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let e = Config::load(&fifo).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
}
