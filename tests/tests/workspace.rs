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
