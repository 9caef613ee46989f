//! The images the real-node tests run (built by `tests/harness/images.sh`, no registry, no
//! container builder) must be the images `operator/Dockerfile` and `worker/Dockerfile` build:
//! the same user, entrypoint, command, port and files. These tests read the Dockerfiles'
//! runtime stage, build both images with the script from stand-in binaries, and compare.
//! They need no harness server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What the runtime stage (the last `FROM`) of a Dockerfile sets.
#[derive(Debug, Default)]
struct Runtime {
    base: String,
    user: String,
    expose: Vec<String>,
    entrypoint: Value,
    cmd: Value,
    /// Destinations of `COPY --from=...` lines: the files the stage adds to its base.
    copied: Vec<String>,
}

fn runtime_stage(dockerfile: &str) -> Result<Runtime> {
    let text = std::fs::read_to_string(repo().join(dockerfile)).context(dockerfile.to_string())?;
    let stage = text
        .rsplit_once("\nFROM ")
        .with_context(|| format!("{dockerfile} has no FROM line"))?
        .1;
    let mut runtime = Runtime::default();
    for (n, line) in stage.lines().enumerate() {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        match (n, word) {
            (0, _) => runtime.base = line.trim().to_string(),
            (_, "USER") => runtime.user = rest.to_string(),
            (_, "EXPOSE") => runtime.expose.extend(rest.split_whitespace().map(|p| {
                if p.contains('/') {
                    p.to_string()
                } else {
                    format!("{p}/tcp")
                }
            })),
            (_, "ENTRYPOINT") => runtime.entrypoint = serde_json::from_str(rest)?,
            (_, "CMD") => runtime.cmd = serde_json::from_str(rest)?,
            (_, "COPY") => runtime.copied.push(
                rest.split_whitespace()
                    .last()
                    .unwrap_or_default()
                    .to_string(),
            ),
            (_, "" | "#") => {}
            (_, other) => bail!(
                "{dockerfile}: the runtime stage has {other}, which this test does not compare; teach it"
            ),
        }
    }
    Ok(runtime)
}

/// One image archive made by images.sh, unpacked: its config and its layer's file list.
struct Image {
    name: String,
    config: Value,
    files: BTreeMap<String, String>,
    root: PathBuf,
}

fn unpack(archive: &Path, into: &Path) -> Result<Image> {
    std::fs::create_dir_all(into)?;
    run(Command::new("tar")
        .arg("xf")
        .arg(archive)
        .arg("-C")
        .arg(into))?;
    let read = |p: &str| -> Result<Value> {
        Ok(serde_json::from_slice(
            &std::fs::read(into.join(p)).context(p.to_string())?,
        )?)
    };
    let blob = |digest: &Value| {
        format!(
            "blobs/sha256/{}",
            digest.as_str().unwrap_or("").trim_start_matches("sha256:")
        )
    };
    let index = read("index.json")?;
    let entry = &index["manifests"][0];
    let name = entry["annotations"]["io.containerd.image.name"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let manifest = read(&blob(&entry["digest"]))?;
    let config = read(&blob(&manifest["config"]["digest"]))?;
    let layer = into.join(blob(&manifest["layers"][0]["digest"]));
    let root = into.join("rootfs");
    std::fs::create_dir_all(&root)?;
    run(Command::new("tar")
        .arg("xzf")
        .arg(&layer)
        .arg("-C")
        .arg(&root))?;
    let listing = run(Command::new("tar").arg("tvzf").arg(&layer))?;
    // "mode owner/group size date time path": the owner and the path of every entry.
    let files = listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                (*f.get(5)?).trim_end_matches('/').to_string(),
                format!("{} {}", f[0], f[1]),
            ))
        })
        .collect();
    Ok(Image {
        name,
        config: config["config"].clone(),
        files,
        root,
    })
}

fn run(command: &mut Command) -> Result<String> {
    let out = command.output().with_context(|| format!("{command:?}"))?;
    ensure!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn chart_app_version() -> Result<String> {
    let chart: Value = serde_yaml::from_str(&std::fs::read_to_string(
        repo().join("charts/vectorpipe/Chart.yaml"),
    )?)?;
    Ok(chart["appVersion"]
        .as_str()
        .context("Chart.yaml has no appVersion")?
        .to_string())
}

#[test]
fn the_harness_images_match_the_dockerfiles() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Stand-in binaries: any dynamically linked executable makes the script do all its steps
    // (ldd, libraries, layout) without building the release binaries.
    let bins = dir.path().join("bin");
    std::fs::create_dir_all(&bins)?;
    for name in ["vectorpipe-operator", "vectorpipe-worker"] {
        std::fs::copy("/bin/true", bins.join(name))?;
    }
    let out = dir.path().join("images");
    run(Command::new("bash")
        .arg(repo().join("tests/harness/images.sh"))
        .arg(&bins)
        .arg(&out)
        .env("VP_CACHE", dir.path().join("cache")))?;

    let version = chart_app_version()?;
    ensure!(
        version == env!("CARGO_PKG_VERSION"),
        "the chart's appVersion {version} is not the workspace version {}: the operator's default worker image and the chart's images would differ",
        env!("CARGO_PKG_VERSION")
    );
    for (name, dockerfile) in [
        ("vectorpipe-operator", "operator/Dockerfile"),
        ("vectorpipe-worker", "worker/Dockerfile"),
    ] {
        let want = runtime_stage(dockerfile)?;
        let image = unpack(&out.join(format!("{name}.tar")), &dir.path().join(name))?;
        let config = &image.config;
        assert_eq!(
            image.name,
            format!("ghcr.io/vectorpipe/{name}:{version}"),
            "{name}: image name (the chart's default)"
        );
        assert_eq!(
            config["User"].as_str(),
            Some(want.user.as_str()),
            "{name}: USER of {dockerfile}"
        );
        assert_eq!(
            config["Entrypoint"], want.entrypoint,
            "{name}: ENTRYPOINT of {dockerfile}"
        );
        assert_eq!(config["Cmd"], want.cmd, "{name}: CMD of {dockerfile}");
        let ports: Vec<String> = config["ExposedPorts"]
            .as_object()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        assert_eq!(ports, want.expose, "{name}: EXPOSE of {dockerfile}");
        // The files the Dockerfile copies in, where it puts them.
        let binary = format!("/usr/local/bin/{name}");
        assert_eq!(
            want.copied,
            vec![binary.clone()],
            "{dockerfile} copies the binary only"
        );
        assert_eq!(
            want.entrypoint[0].as_str(),
            Some(binary.as_str()),
            "{dockerfile}: the entrypoint is the copied binary"
        );
        assert!(
            image.files.contains_key(binary.trim_start_matches('/')),
            "{name}: no {binary} in the image"
        );
        // What the Dockerfile's base image (distroless cc, nonroot) provides and the worker and
        // operator rely on: a CA bundle, the nonroot user and group, a writable /tmp, no shell.
        assert!(
            want.base
                .starts_with("gcr.io/distroless/cc-debian12:nonroot"),
            "{dockerfile}: the runtime base changed to {}; check what images.sh must copy",
            want.base
        );
        let ca = std::fs::read_to_string(image.root.join("etc/ssl/certs/ca-certificates.crt"))?;
        assert!(ca.contains("BEGIN CERTIFICATE"), "{name}: no CA bundle");
        let uid = want.user.split(':').next().unwrap_or_default();
        let passwd = std::fs::read_to_string(image.root.join("etc/passwd"))?;
        assert!(
            passwd.lines().any(|l| l.split(':').nth(2) == Some(uid)),
            "{name}: /etc/passwd has no user {uid}:\n{passwd}"
        );
        let group = std::fs::read_to_string(image.root.join("etc/group"))?;
        assert!(
            group.lines().any(|l| l.split(':').nth(2) == Some(uid)),
            "{name}: /etc/group has no group {uid}"
        );
        assert!(
            image
                .files
                .get("tmp")
                .is_some_and(|m| m.starts_with("drwxrwxrwt")),
            "{name}: /tmp is not a sticky, world-writable directory"
        );
        for shell in ["bin/sh", "bin/bash", "usr/bin/sh"] {
            assert!(
                !image.files.contains_key(shell),
                "{name}: the image carries a shell at /{shell}"
            );
        }
        assert!(
            image.files.values().all(|owner| owner.ends_with("0/0")),
            "{name}: files not owned by root"
        );
        // The dynamic loader and every library the binary links are in the image.
        for lib in run(Command::new("ldd").arg(bins.join(name)))?
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            assert!(
                image.files.contains_key(lib.trim_start_matches('/')),
                "{name}: {lib}, which the binary links, is missing"
            );
        }
    }
    Ok(())
}
