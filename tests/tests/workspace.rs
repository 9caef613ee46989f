//! Rules about the workspace itself.

use std::process::Command;

#[test]
fn the_worker_does_not_depend_on_kube() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            "vectorpipe-worker",
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
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        tree.contains("vectorpipe-crds"),
        "the worker reads the shared API types:\n{tree}"
    );
    let kube: Vec<&str> = tree.lines().filter(|l| l.starts_with("kube")).collect();
    assert!(
        kube.is_empty(),
        "the worker must build without kube, found {kube:?}"
    );
}
