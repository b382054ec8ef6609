//! Deployment, checked without a cluster or a container engine: the runtime tree the Dockerfile
//! builds (made by the same script), the rendered Kubernetes overlays against the server's own
//! config loader, routes and settings, the Kubernetes API schemas, and the Dockerfile linter.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{root, tool};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ortserve");

/// `kubectl kustomize` of an overlay, as JSON documents.
fn render(overlay: &str) -> (String, Vec<Value>) {
    let out = Command::new("kubectl")
        .args([
            "kustomize",
            root().join("k8s/overlays").join(overlay).to_str().unwrap(),
        ])
        .output()
        .expect("kubectl (with kustomize) is needed for the deployment tests");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    (text, docs)
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// Lays out the runtime tree (CPU variant) with this build's binary.
fn layout(dest: &Path) {
    let out = Command::new(root().join("scripts/layout-runtime.sh"))
        .args([dest.to_str().unwrap(), "--binary", BIN, "--variant", "cpu"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// GET `path`: the status and the body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.get(9..12)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_string()))
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(status, _)| status)
}

/// Every `ortserve_*` metric named in `text` (a manifest), with the label names its selectors
/// and `by (...)` clauses use.
fn metrics_named(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut rest = text;
    while let Some(at) = rest.find("ortserve_") {
        let tail = &rest[at..];
        let name: String = tail.chars().take_while(|&c| word(c)).collect();
        let mut labels = Vec::new();
        if let Some(sel) = tail[name.len()..].strip_prefix('{') {
            for m in sel.split('}').next().unwrap_or("").split(',') {
                let label: String = m.trim().chars().take_while(|&c| word(c)).collect();
                if !label.is_empty() {
                    labels.push(label);
                }
            }
        }
        // A `by (...)` clause just before the metric groups by its labels.
        if let Some(by) = rest[..at].rfind("by (") {
            let group = &rest[by + 4..at];
            if let Some(end) = group.find(')') {
                labels.extend(group[..end].split(',').map(|l| l.trim().to_string()));
            }
        }
        out.push((name.clone(), labels));
        rest = &tail[name.len()..];
    }
    out
}

#[test]
fn the_runtime_tree_starts_and_the_overlays_fit_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("opt-ortserve");
    layout(&tree);
    for f in [
        "ortserve",
        "lib/libonnxruntime.so",
        "models/efficientnet_lite0.onnx",
        "models/imagenet_labels.txt",
        "config/config.yaml",
    ] {
        assert!(tree.join(f).exists(), "{f} missing from the tree");
    }

    // The binary starts from the tree alone: the library next to it, the baked-in config.
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, admin_port) = (free_port(), free_port());
    let log = dir.path().join("server.log");
    let mut server = Command::new(tree.join("ortserve"))
        .args([
            "serve",
            "--config",
            tree.join("config/config.yaml").to_str().unwrap(),
        ])
        .env_remove("ORT_DYLIB_PATH")
        .env("ORTSERVE_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("ORTSERVE_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
        .env("ORTSERVE_GRPC_ADDR", "127.0.0.1:0")
        .env("ORTSERVE_LOG_FORMAT", "text")
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while http_status(port, "/v2/health/ready") != Some(200) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not ready: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The image's HEALTHCHECK, as the Dockerfile writes it, against the port the baked-in
    // config's admin_addr names (here moved to `admin_port`).
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let check_url = dockerfile
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .find_map(|l| l.split('"').find(|w| w.starts_with("http://")))
        .expect("the HEALTHCHECK's probe URL");
    let baked = ortserve::config::Config::from_yaml(
        &std::fs::read_to_string(tree.join("config/config.yaml")).unwrap(),
    )
    .unwrap();
    let baked_admin = baked.server.admin_addr.as_deref().expect("an admin port");
    let check_port = check_url
        .trim_start_matches("http://")
        .split(['/', ':'])
        .nth(1)
        .unwrap();
    assert_eq!(
        Some(check_port),
        baked_admin.rsplit(':').next(),
        "HEALTHCHECK {check_url} vs the image config's admin_addr {baked_admin}"
    );
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("EXPOSE") && l.split_whitespace().any(|p| p == check_port)),
        "the Dockerfile exposes the admin port"
    );
    let url = check_url.replace(&format!(":{check_port}/"), &format!(":{admin_port}/"));
    let probe = Command::new(tree.join("ortserve"))
        .args(["probe", "--url", &url])
        .status()
        .unwrap();
    assert!(probe.success(), "the image's HEALTHCHECK command: {url}");

    // The poll overlay's model volume at /models, as its sync would fill it: a versioned folder
    // holding the image's model as version 1.
    let volume = tempfile::tempdir().unwrap();
    let version = volume.path().join("efficientnet_lite0/1");
    std::fs::create_dir_all(&version).unwrap();
    std::os::unix::fs::symlink(
        tree.join("models/efficientnet_lite0.onnx"),
        version.join("model.onnx"),
    )
    .unwrap();
    for overlay in ["cpu", "gpu", "poll"] {
        let (_, docs) = render(overlay);
        // The ConfigMap's YAML loads and validates with the server's own loader, against the tree
        // and the volume.
        let cm = kind(&docs, "ConfigMap");
        let yaml = cm["data"]["config.yaml"]
            .as_str()
            .unwrap()
            .replace("/opt/ortserve", tree.to_str().unwrap())
            .replace(" /models/", &format!(" {}/", volume.path().display()));
        let config =
            ortserve::config::Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{overlay}: {e}"));
        config
            .validate()
            .unwrap_or_else(|e| panic!("{overlay}: {e}"));

        let deploy = kind(&docs, "Deployment");
        let pod = &deploy["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        if overlay == "poll" {
            // The model comes from the volume mounted at /models, and is polled.
            assert_eq!(
                config.server.model_control,
                ortserve::config::ModelControl::Poll
            );
            let mounted = c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["mountPath"] == "/models" && m["readOnly"] == true);
            assert!(mounted, "poll: no read-only volume at /models");
            // Versions: the volume's version 1 is what it serves.
            let versions = ortserve::config::versions_of(&config.models[0]).unwrap();
            assert_eq!(
                versions
                    .iter()
                    .map(|m| m.version.as_str())
                    .collect::<Vec<_>>(),
                ["1"]
            );
            // The config is read again while serving: its ConfigMap keeps its name (a hash
            // suffix would make every change a new ConfigMap and a rollout), and is mounted as a
            // folder (a subPath mount is never updated by the kubelet).
            assert_eq!(cm["metadata"]["name"], "ortserve-config");
            let config_mount = c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["mountPath"] == "/etc/ortserve")
                .expect("the config volume");
            assert!(config_mount.get("subPath").is_none(), "{config_mount:?}");
        }
        // Probes and the scrape: real routes, on the admin port the config listens on (so
        // clients that hold every API connection cannot starve them).
        let declared = |name: &str| {
            c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("{overlay}: no container port named {name}"))
        };
        let port_of = |addr: &str| -> u64 {
            let a: std::net::SocketAddr = addr.parse().unwrap();
            u64::from(a.port())
        };
        assert_eq!(
            declared("http"),
            port_of(&config.server.http_addr),
            "{overlay}: containerPort vs http_addr"
        );
        let admin_addr = config.server.admin_addr.as_deref().expect("admin_addr");
        assert_eq!(
            declared("admin"),
            port_of(admin_addr),
            "{overlay}: containerPort vs admin_addr"
        );
        let grpc_addr = config.server.grpc_addr.as_deref().expect("grpc_addr");
        assert_eq!(
            declared("grpc"),
            port_of(grpc_addr),
            "{overlay}: containerPort vs grpc_addr"
        );
        let service = kind(&docs, "Service");
        let grpc_port = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "grpc")
            .unwrap_or_else(|| panic!("{overlay}: the Service has no grpc port"));
        assert_eq!(grpc_port["targetPort"], "grpc");
        assert_eq!(grpc_port["appProtocol"], "kubernetes.io/h2c");
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["port"], "admin", "{overlay} {probe} port");
            let path = get["path"].as_str().unwrap();
            assert_eq!(
                http_status(admin_port, path),
                Some(200),
                "{overlay} {probe}: {path} on the running server's admin port"
            );
        }
        let scrape = &deploy["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(
            scrape["prometheus.io/port"].as_str().map(str::to_string),
            Some(declared("admin").to_string()),
            "{overlay}: the scrape annotation names the admin port"
        );
        let path = scrape["prometheus.io/path"].as_str().unwrap();
        assert_eq!(
            http_status(admin_port, path),
            Some(200),
            "{overlay}: {path}"
        );
        // Grace period covers preStop + drain_delay + shutdown_timeout with a margin.
        let grace = pod["terminationGracePeriodSeconds"].as_f64().unwrap();
        let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_f64()
            .unwrap_or(0.0);
        let needed = pre_stop
            + config.server.drain_delay.0.as_secs_f64()
            + config.server.shutdown_timeout.0.as_secs_f64();
        assert!(
            grace >= needed + 5.0,
            "{overlay}: grace {grace}s < {needed}s + 5s margin"
        );
        // Non-root, read-only root filesystem, no privilege escalation, no capabilities.
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{overlay}");
        assert_eq!(
            c["securityContext"]["readOnlyRootFilesystem"], true,
            "{overlay}"
        );
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"], false,
            "{overlay}"
        );
        assert_eq!(
            c["securityContext"]["capabilities"]["drop"][0], "ALL",
            "{overlay}"
        );
        // The ConfigMap is mounted where the args point.
        assert_eq!(c["args"][2], "/etc/ortserve/config.yaml");
        assert!(c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == "/etc/ortserve"));
        for k in [
            "Service",
            "ServiceAccount",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "NetworkPolicy",
        ] {
            kind(&docs, k);
        }
        let gpus = &c["resources"]["limits"]["nvidia.com/gpu"];
        if overlay == "gpu" {
            assert_eq!(gpus, 1, "the gpu overlay asks for a GPU in limits");
            assert_eq!(
                config.models[0].devices.0[0].device,
                ortserve::config::DeviceSpec::All(ortserve::config::ProviderKind::Cuda)
            );
            assert_eq!(c["image"], "ortserve:cuda");
        } else {
            assert!(gpus.is_null());
            assert_eq!(c["image"], "ortserve:cpu");
        }
    }
    // Autoscaling: the gpu overlay's HPA scales on ortserve_saturation, and every metric the
    // manifests name (HPA, prometheus-adapter rule, KEDA ScaledObject) is on /metrics, with the
    // labels they select or group by: its own, or `namespace` and `pod`, which Prometheus's
    // kubernetes_sd scrape adds.
    let (_, gpu_docs) = render("gpu");
    let hpa = kind(&gpu_docs, "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["metrics"][0]["type"], "Pods", "{hpa}");
    assert_eq!(
        hpa["spec"]["metrics"][0]["pods"]["metric"]["name"], "ortserve_saturation",
        "{hpa}"
    );
    let (_, metrics) = http_get(port, "/metrics").unwrap();
    let mut texts = vec![serde_json::to_string(hpa).unwrap()];
    for f in [
        "k8s/autoscaling/prometheus-adapter-rules.yaml",
        "k8s/autoscaling/keda-scaledobject.yaml",
    ] {
        texts.push(std::fs::read_to_string(root().join(f)).unwrap());
    }
    let mut checked = 0;
    for text in &texts {
        for (name, labels) in metrics_named(text) {
            let exported: Vec<&str> = metrics
                .lines()
                .filter(|l| {
                    l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))
                })
                .collect();
            assert!(
                !exported.is_empty(),
                "{name} is not on /metrics:\n{metrics}"
            );
            for label in labels {
                let scrape = ["namespace", "pod"].contains(&label.as_str());
                assert!(
                    scrape || exported.iter().any(|l| l.contains(&format!("{label}=\""))),
                    "{name} has no label {label}: {exported:?}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} metric references found");

    let _ = server.kill();
    let _ = server.wait();
    let log = std::fs::read_to_string(&log).unwrap();
    let lib = tree.join("lib/libonnxruntime.so");
    assert!(
        log.contains(&format!("library={}", lib.display())),
        "the tree's own library was loaded:\n{log}"
    );
}

#[test]
fn the_manifests_pass_the_kubernetes_schemas() {
    let validator = tool("kubernetes-validate");
    for overlay in ["cpu", "gpu", "poll"] {
        let (text, _) = render(overlay);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, text).unwrap();
        let out = Command::new(&validator)
            .args(["--strict", file.to_str().unwrap()])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{overlay}: {report}");
        assert_eq!(
            report.matches(" passed for resource ").count(),
            7,
            "{overlay}: every resource checked\n{report}"
        );
    }
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let out = Command::new(tool("hadolint"))
        .arg(root().join("Dockerfile"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The labels `selector` (a `matchLabels` map, or a Service's plain map) asks for.
fn match_labels(selector: &Value) -> serde_json::Map<String, Value> {
    let labels = if selector.get("matchLabels").is_some() {
        &selector["matchLabels"]
    } else {
        selector
    };
    labels.as_object().cloned().unwrap_or_default()
}

/// Issue 26, defect 2: every object that selects pods selects the Deployment's pods. In
/// policy/v1 a PDB without a selector selects nothing, and a NetworkPolicy without a
/// podSelector applies to every pod of the namespace; kustomize's `includeSelectors` fills
/// neither. Also: the policy lets in every port the pods listen on, and the autoscalers (the
/// HPA here, KEDA's ScaledObject beside the overlays) scale this Deployment.
#[test]
fn every_object_that_selects_pods_selects_the_deployments_pods() {
    let keda: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("k8s/autoscaling/keda-scaledobject.yaml")).unwrap(),
    )
    .unwrap();
    for overlay in ["cpu", "gpu", "poll"] {
        let (_, docs) = render(overlay);
        let deployment = kind(&docs, "Deployment");
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let selects_the_pods = |what: &str, selector: &Value| {
            let wanted = match_labels(selector);
            assert!(
                !wanted.is_empty(),
                "{overlay}: the {what} selects no pods or every pod: {selector}"
            );
            for (k, v) in &wanted {
                assert_eq!(
                    pod_labels.get(k),
                    Some(v),
                    "{overlay}: the {what} asks for {k}={v}, which the pods do not have ({pod_labels:?})"
                );
            }
        };
        selects_the_pods("Deployment", &deployment["spec"]["selector"]);
        selects_the_pods("Service", &kind(&docs, "Service")["spec"]["selector"]);
        selects_the_pods(
            "PodDisruptionBudget",
            &kind(&docs, "PodDisruptionBudget")["spec"]["selector"],
        );
        let policy = kind(&docs, "NetworkPolicy");
        selects_the_pods("NetworkPolicy", &policy["spec"]["podSelector"]);
        // Every container port is let in by some ingress rule.
        let allowed: Vec<u64> = policy["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|rule| rule["ports"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["port"].as_u64())
            .collect();
        for c in deployment["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
        {
            for p in c["ports"].as_array().cloned().unwrap_or_default() {
                let port = p["containerPort"].as_u64().unwrap();
                assert!(
                    allowed.contains(&port),
                    "{overlay}: the NetworkPolicy does not let in port {port}: {allowed:?}"
                );
            }
        }
        let hpa = kind(&docs, "HorizontalPodAutoscaler");
        assert_eq!(
            hpa["spec"]["scaleTargetRef"]["kind"], "Deployment",
            "{overlay}"
        );
        assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], name, "{overlay}");
        assert_eq!(
            keda["spec"]["scaleTargetRef"]["name"], name,
            "KEDA's target"
        );
        assert!(
            !docs.iter().any(|d| d["kind"] == "ServiceMonitor"),
            "a ServiceMonitor needs its selector checked here too"
        );
    }
}
