//! Rules about the workspace itself.

use std::process::Command;

/// The normal dependency tree of a workspace package, one crate a line.
fn tree(package: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(vectorpipe_tests::repo_root())
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_worker_and_the_kafka_crate_do_not_depend_on_kube() {
    for package in ["vectorpipe-worker", "vectorpipe-kafka"] {
        let tree = tree(package);
        assert!(
            tree.contains("vectorpipe-crds"),
            "{package} reads the shared API types:\n{tree}"
        );
        let kube: Vec<&str> = tree.lines().filter(|l| l.starts_with("kube")).collect();
        assert!(
            kube.is_empty(),
            "{package} must build without kube, found {kube:?}"
        );
    }
    assert!(
        tree("vectorpipe-worker").contains("vectorpipe-kafka"),
        "the worker's Kafka settings come from the shared crate"
    );
}

/// One HTTPS client stack: the Bedrock SDK's default features add a second, legacy one (hyper
/// 0.14, rustls 0.21 and ring), which every build then compiles for nothing.
#[test]
fn the_binaries_carry_one_https_stack() {
    for package in ["vectorpipe-worker", "vectorpipe-operator"] {
        let tree = tree(package);
        let legacy: Vec<&str> = tree
            .lines()
            .filter(|l| {
                l.starts_with("hyper v0.")
                    || l.starts_with("rustls v0.21")
                    || l.starts_with("ring v")
            })
            .collect();
        assert!(
            legacy.is_empty(),
            "{package} pulls in a second HTTPS stack {legacy:?}: turn off the default features \
             of the AWS crate that brings it (cargo tree -i hyper@0.14 shows which)"
        );
    }
}
