//! deploy/ checked offline: `deploy/check.py` resolves the compose file with docker-compose and checks
//! volumes, start order, published ports and CPU/thread limits; it checks the Kubernetes manifests'
//! probes, grace period, resources and KEDA scalers against the worker's settings, and validates the
//! built-in kinds against Kubernetes' OpenAPI schemas (kubernetes-validate, installed by scripts/setup).

use std::path::Path;

#[test]
fn compose_and_kubernetes_manifests_pass_the_offline_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let python = root.join(".deps/venv/bin/python");
    assert!(python.is_file(), "{} missing: run scripts/setup", python.display());
    let out = std::process::Command::new(&python).arg(root.join("deploy/check.py")).output().expect("run deploy/check.py");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "deploy/check.py failed:\n{stdout}{stderr}");
    // Each group ran (scripts/setup installs docker-compose and kubernetes-validate): none skipped.
    for group in ["compose: ok", "k8s: ok", "k8s schemas: ok"] {
        assert!(stdout.contains(&format!("check: {group}")), "{group} missing:\n{stdout}{stderr}");
    }
}
