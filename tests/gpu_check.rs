//! scripts/gpu-check.sh as far as a machine without a GPU can take it: arguments, and a clear
//! failure when the CUDA libraries or the GPU are missing.

use std::path::Path;
use std::process::Command;

fn script(args: &[&str]) -> (Option<i32>, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/gpu-check.sh"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn arguments_are_checked() {
    let (code, err) = script(&[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--binary") && err.contains("--ort-lib"),
        "{err}"
    );
    let (code, err) = script(&["--bogus"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown argument --bogus"), "{err}");
    let (code, err) = script(&["--binary", "/nonexistent/ortserve", "--ort-lib", "/tmp"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("no executable ortserve at /nonexistent/ortserve"),
        "{err}"
    );
}

#[test]
fn missing_cuda_libraries_or_gpu_are_clear_failures() {
    let bin = env!("CARGO_BIN_EXE_ortserve");
    let empty = tempfile::tempdir().unwrap();
    let (code, err) = script(&["--binary", bin, "--ort-lib", empty.path().to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no libonnxruntime.so.1.* in"), "{err}");

    // The CPU library has no CUDA provider next to it.
    let cpu_lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ortserve/lib");
    let (code, err) = script(&["--binary", bin, "--ort-lib", cpu_lib.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("libonnxruntime_providers_cuda.so missing"),
        "{err}"
    );

    // Every file present (empty stand-ins): the next check is the GPU itself.
    let fake = tempfile::tempdir().unwrap();
    for f in [
        "libonnxruntime.so.1.31.1",
        "libonnxruntime_providers_shared.so",
        "libonnxruntime_providers_cuda.so",
    ] {
        std::fs::write(fake.path().join(f), b"").unwrap();
    }
    let (code, err) = script(&[
        "--binary",
        bin,
        "--ort-lib",
        fake.path().to_str().unwrap(),
        "--seconds",
        "1",
    ]);
    assert_eq!(code, Some(2), "{err}");
    let has_gpu = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|d| d.count() > 0)
        .unwrap_or(false);
    if has_gpu {
        // With a GPU, the stand-in library makes ortserve itself fail at startup.
        assert!(err.contains("ortserve exited during startup"), "{err}");
    } else {
        assert!(err.contains("no NVIDIA GPU visible"), "{err}");
    }
}
