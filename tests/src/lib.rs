//! Access to the real servers that `tests/harness/up.sh` starts, for the end-to-end tests.
//!
//! `up.sh` writes the servers' addresses to `$VP_RUN/env`; `tests/run-all.sh` sources that file
//! before `cargo test`, so the tests read plain environment variables.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod bedrock;
pub mod chaos;
pub mod quota;

/// Reads a variable that `up.sh` sets, with a message that says how to get it.
pub fn harness_var(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| {
        format!(
            "{name} is not set: start the servers with tests/harness/up.sh and source \
             $VP_RUN/env (tests/run-all.sh does both)"
        )
    })
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The block of the README that starts with `$ <command>`: the lines after it up to the fence.
pub fn readme_block(command: &str) -> Result<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md"))?;
    let start = format!("$ {command}\n");
    let at = readme
        .find(&start)
        .with_context(|| format!("the README shows no `$ {command}` block"))?;
    let rest = &readme[at + start.len()..];
    let end = rest.find("```").context("the README block does not end")?;
    Ok(rest[..end].to_owned())
}

/// A name that no other test (or earlier run) uses, for namespaces, topics and groups.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos:08x}", std::process::id())
}

/// Polls `check` until it returns `Some`, or fails after `limit` with `what` in the message.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            match last_error {
                Some(e) => bail!("{what}: not reached within {limit:?}; last error: {e:#}"),
                None => bail!("{what}: not reached within {limit:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The harness Kubernetes control plane.
pub mod k8s {
    use super::*;

    /// Whether the pipeline's Ready condition is True.
    pub fn is_ready(pipeline: &vectorpipe_crds::v1alpha1::EmbeddingPipeline) -> bool {
        pipeline
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .any(|c| c.type_ == "Ready" && c.status == "True")
    }

    /// Waits up to 150 s for the pipeline `name` to be Ready (`what` names the wait).
    pub async fn wait_ready(
        pipelines: &kube::Api<vectorpipe_crds::v1alpha1::EmbeddingPipeline>,
        name: &str,
        what: &str,
    ) -> Result<vectorpipe_crds::v1alpha1::EmbeddingPipeline> {
        eventually(what, Duration::from_secs(150), || async {
            let pipeline = pipelines.get(name).await?;
            Ok(is_ready(&pipeline).then_some(pipeline))
        })
        .await
    }

    /// The kubeconfig of the harness cluster (admin token).
    pub fn kubeconfig() -> Result<PathBuf> {
        harness_var("VP_KUBECONFIG").map(PathBuf::from)
    }

    /// A kube client for the harness cluster.
    pub async fn client() -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig()?)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Runs a harness tool and returns its stdout; a failure carries its stderr.
    fn run(name: &str, command: &mut Command, args: &[&str]) -> Result<String> {
        let out = command
            .args(args)
            .output()
            .with_context(|| format!("running {name}"))?;
        if !out.status.success() {
            bail!(
                "{name} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs kubectl (v1.37, from the harness cache) against the harness cluster.
    pub fn kubectl(args: &[&str]) -> Result<String> {
        let mut command = Command::new(harness_var("VP_KUBECTL")?);
        command.arg(format!("--kubeconfig={}", kubeconfig()?.display()));
        run("kubectl", &mut command, args)
    }

    /// Installs the CRDs from `crds/` and waits until they are served.
    pub fn install_crds() -> Result<()> {
        let dir = repo_root().join("crds");
        let dir = dir.to_string_lossy();
        kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &dir])?;
        for crd in [
            "embeddingpipelines.vectorpipe.io",
            "scalingpolicies.vectorpipe.io",
        ] {
            wait_established(crd)?;
        }
        Ok(())
    }

    /// Waits until a CRD is Established. (Right after creation it has no conditions at all,
    /// which `kubectl wait` treats as an error, so the status is read instead.)
    pub fn wait_established(crd: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = kubectl(&["get", &format!("crd/{crd}"), "-o", "json"])?;
            let value: serde_json::Value = serde_json::from_str(&text)?;
            let established = value["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Established" && c["status"] == "True");
            if established {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("CRD {crd} was not Established within 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Writes a kubeconfig that impersonates `user` (the admin token may impersonate anyone).
    pub fn impersonating_kubeconfig(user: &str, path: &Path) -> Result<PathBuf> {
        let mut config: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(kubeconfig()?)?)?;
        let user_entry = config["users"][0]["user"]
            .as_mapping_mut()
            .context("the harness kubeconfig has no user")?;
        user_entry.insert("as".into(), user.into());
        std::fs::write(path, serde_yaml::to_string(&config)?)?;
        Ok(path.to_owned())
    }

    /// Runs the harness helm (v4) against the harness cluster and returns its stdout.
    pub fn helm(args: &[&str]) -> Result<String> {
        let home = std::env::temp_dir().join("vp-helm");
        let mut command = Command::new(harness_var("VP_HELM")?);
        command
            .env("KUBECONFIG", kubeconfig()?)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        run("helm", &mut command, args)
    }

    /// `helm template` of the repository's chart as release `vp` in `vp-system`, with extra
    /// `--set`s, as YAML documents.
    pub fn chart_template(sets: &[&str]) -> Result<Vec<serde_json::Value>> {
        let chart = repo_root().join("charts/vectorpipe");
        let chart = chart.to_string_lossy();
        let mut args = vec!["template", "vp", chart.as_ref(), "-n", "vp-system"];
        for set in sets {
            args.extend(["--set", set]);
        }
        let text = helm(&args)?;
        let mut docs = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(doc)?;
            if !value.is_null() {
                docs.push(value);
            }
        }
        Ok(docs)
    }

    /// Creates ScalingPolicy `posts` on pipeline `posts` in `namespace` whose only metric reads a
    /// Prometheus that does not answer, so the operator sets `fallbackReplicas: 2` through the
    /// scale subresource (what the RBAC tests exercise).
    pub async fn create_fallback_policy(client: &kube::Client, namespace: &str) -> Result<()> {
        use kube::api::{Api, PostParams};
        use vectorpipe_crds::v1alpha1::ScalingPolicy;
        let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let policy: ScalingPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "vectorpipe.io/v1alpha1",
            "kind": "ScalingPolicy",
            "metadata": {"name": "posts"},
            "spec": {
                "targetRef": {"name": "posts"},
                "maxReplicas": 3,
                "fallbackReplicas": 2,
                "pollInterval": "1s",
                "prometheus": {"address": format!("http://{closed}")},
                "metrics": [{"prometheus": {"query": "vector(1)"}, "scaleOutThreshold": 5}]
            }
        }))?;
        Api::<ScalingPolicy>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &policy)
            .await?;
        Ok(())
    }

    /// Runs `kubectl vectorpipe ARGS` against the harness cluster: kubectl finds the plugin
    /// binary on PATH (the target directory put first). Returns its stdout; a failure carries
    /// its stderr.
    pub fn kubectl_plugin(args: &[&str]) -> Result<String> {
        kubectl_plugin_with(args, &[])
    }

    /// [`kubectl_plugin`] with more environment variables.
    pub fn kubectl_plugin_with(args: &[&str], env: &[(&str, &str)]) -> Result<String> {
        let dir = crate::worker::binary("kubectl-vectorpipe")?
            .parent()
            .context("no target directory")?
            .to_owned();
        let path = format!(
            "{}:{}",
            dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = Command::new(harness_var("VP_KUBECTL")?);
        command
            .arg("vectorpipe")
            .env("PATH", path)
            .env("KUBECONFIG", kubeconfig()?)
            .envs(env.iter().copied());
        run("kubectl vectorpipe", &mut command, args)
    }

    /// The label of pods bound for the real node (`up.sh node`).
    pub const REAL_NODE_LABEL: &str = "vectorpipe.io/real-node";

    /// What every pod bound for the real node carries: the toleration of its taint, a selector
    /// for it, and the label of the harness' host-network policy (as chart values or a
    /// pipeline's `workers`).
    pub fn on_the_real_node() -> serde_json::Value {
        serde_json::json!({
            "podLabels": {REAL_NODE_LABEL: "true"},
            "nodeSelector": {"kubernetes.io/hostname": "127.0.0.1"},
            "tolerations": [{"key": REAL_NODE_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
        })
    }

    /// `spec.workers` of a pipeline whose one worker runs on the real node, with the fake
    /// Bedrock's keys from the Secret `aws` ([`create_aws_secret`]).
    pub fn real_node_workers() -> serde_json::Value {
        let mut workers = on_the_real_node();
        workers["replicas"] = serde_json::json!(1);
        workers["env"] = serde_json::json!([
            {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "aws", "key": "id"}}},
            {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "aws", "key": "secret"}}},
            {"name": "AWS_EC2_METADATA_DISABLED", "value": "true"},
        ]);
        workers["resources"] = serde_json::json!({"requests": {"cpu": "50m", "memory": "256Mi"}});
        workers
    }

    /// The Secret `aws` in `namespace` with the fake Bedrock's access keys.
    pub fn create_aws_secret(namespace: &str) -> Result<()> {
        kubectl(&[
            "create",
            "secret",
            "generic",
            "aws",
            "-n",
            namespace,
            &format!("--from-literal=id={}", crate::bedrock::ACCESS_KEY_ID),
            &format!(
                "--from-literal=secret={}",
                crate::bedrock::SECRET_ACCESS_KEY
            ),
        ])?;
        Ok(())
    }

    /// `helm install`s the chart as `release` in `namespace` on the real node, watching only
    /// that namespace, and waits for the operator pod.
    pub fn install_operator_on_the_real_node(namespace: &str, release: &str) -> Result<()> {
        let placement = on_the_real_node();
        let values = serde_json::json!({
            "podLabels": placement["podLabels"],
            "nodeSelector": placement["nodeSelector"],
            "tolerations": placement["tolerations"],
            "metrics": {"port": crate::worker::free_port()?},
            "watchNamespaces": [namespace],
            "logFormat": "text",
        });
        let values_file = std::env::temp_dir().join(format!("{release}-values.yaml"));
        std::fs::write(&values_file, serde_yaml::to_string(&values)?)?;
        let chart = repo_root().join("charts/vectorpipe");
        helm(&[
            "install",
            release,
            &chart.to_string_lossy(),
            "-n",
            namespace,
            "-f",
            &values_file.to_string_lossy(),
            "--wait",
            "--timeout",
            "180s",
        ])
        .context("helm install of the operator image on the real node")?;
        Ok(())
    }

    /// Creates a namespace for one test; it is removed when the guard is dropped.
    pub fn namespace(prefix: &str) -> Result<Namespace> {
        let name = unique_name(prefix);
        kubectl(&["create", "namespace", &name])?;
        Ok(Namespace { name })
    }

    /// A namespace owned by one test.
    pub struct Namespace {
        /// Its name.
        pub name: String,
    }

    impl Drop for Namespace {
        fn drop(&mut self) {
            let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
        }
    }
}

/// The harness Kafka broker.
pub mod kafka {
    use super::*;
    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    /// `host:port` of the broker.
    pub fn bootstrap() -> Result<String> {
        harness_var("VP_KAFKA_BOOTSTRAP")
    }

    /// A client configuration pointed at the broker.
    pub fn config() -> Result<ClientConfig> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", bootstrap()?);
        Ok(config)
    }

    /// Creates a topic with `partitions` partitions and waits for the broker to confirm it.
    pub async fn create_topic(name: &str, partitions: i32) -> Result<()> {
        create_topic_with(name, partitions, &[]).await
    }

    /// Creates a topic with topic configs (e.g. `max.message.bytes`).
    pub async fn create_topic_with(
        name: &str,
        partitions: i32,
        configs: &[(&str, &str)],
    ) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = config()?.create()?;
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (key, value) in configs {
            topic = topic.set(key, value);
        }
        let results = admin
            .create_topics(
                &[topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await?;
        for result in results {
            result.map_err(|(topic, code)| anyhow::anyhow!("creating topic {topic}: {code}"))?;
        }
        Ok(())
    }

    /// True once `group` committed the end of every one of `topic`'s `partitions` (a
    /// partition that never had a record counts as done).
    pub fn commits_at_end(topic: &str, group: &str, partitions: i32) -> Result<bool> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let observer: BaseConsumer = config()?.set("group.id", group).create()?;
        let mut wanted = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            wanted.add_partition(topic, p);
        }
        let committed = observer.committed_offsets(wanted, Duration::from_secs(5))?;
        for p in 0..partitions {
            let (_, high) = observer.fetch_watermarks(topic, p, Duration::from_secs(5))?;
            let done = match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(rdkafka::Offset::Offset(o)) => o == high,
                _ => high == 0,
            };
            if !done {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Waits until [`commits_at_end`] holds.
    pub async fn wait_for_commits_at_end(
        topic: &str,
        group: &str,
        partitions: i32,
        limit: Duration,
    ) -> Result<()> {
        crate::eventually(
            "committed offsets at the end of every partition",
            limit,
            || async move { Ok(commits_at_end(topic, group, partitions)?.then_some(())) },
        )
        .await
    }
}

/// The harness Prometheus server.
pub mod prometheus {
    use super::*;

    /// The server's base URL.
    pub fn url() -> Result<String> {
        harness_var("VP_PROMETHEUS_URL")
    }

    /// Makes Prometheus scrape `address` (`host:port`, path `/metrics`) with the given labels,
    /// through its file-based service discovery. Returns the file to delete to stop it.
    pub fn add_target(name: &str, address: &str, labels: &[(&str, &str)]) -> Result<PathBuf> {
        let dir = PathBuf::from(harness_var("VP_PROMETHEUS_TARGETS")?);
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
            .collect();
        let body = serde_json::json!([{ "targets": [address], "labels": labels }]);
        let path = dir.join(format!("{name}.json"));
        // Written under another name and renamed, so Prometheus never reads half a file.
        let partial = dir.join(format!(".{name}.json.partial"));
        std::fs::write(&partial, serde_json::to_vec(&body)?)?;
        std::fs::rename(&partial, &path)?;
        Ok(path)
    }
}

/// The harness OpenSearch node.
pub mod opensearch {
    use super::*;
    use ::opensearch::OpenSearch;
    use ::opensearch::http::transport::Transport;

    /// The node's base URL.
    pub fn url() -> Result<String> {
        harness_var("VP_OPENSEARCH_URL")
    }

    /// A client for the node.
    pub fn client() -> Result<OpenSearch> {
        Ok(OpenSearch::new(Transport::single_node(&url()?)?))
    }

    /// Deletes `index` (nothing when it does not exist).
    pub async fn delete_index(index: &str) -> Result<()> {
        use ::opensearch::indices::IndicesDeleteParts;
        let response = client()?
            .indices()
            .delete(IndicesDeleteParts::Index(&[index]))
            .send()
            .await?;
        let status = response.status_code().as_u16();
        anyhow::ensure!(
            status == 200 || status == 404,
            "deleting index {index} answered {status}"
        );
        Ok(())
    }

    /// The documents in `index`, after a refresh (so every acknowledged write counts); 0 while
    /// the index does not exist yet.
    pub async fn count(index: &str) -> Result<u64> {
        use ::opensearch::CountParts;
        use ::opensearch::indices::IndicesRefreshParts;
        let client = client()?;
        client
            .indices()
            .refresh(IndicesRefreshParts::Index(&[index]))
            .send()
            .await?;
        let answer: serde_json::Value = client
            .count(CountParts::Index(&[index]))
            .send()
            .await?
            .json()
            .await?;
        if answer["status"] == 404 {
            return Ok(0);
        }
        answer["count"]
            .as_u64()
            .with_context(|| format!("no count of {index}: {answer}"))
    }

    /// Counts of a [`signing_proxy`]'s requests.
    #[derive(Default)]
    pub struct ProxyCounts {
        /// Requests whose SigV4 signature was right (forwarded).
        pub verified: std::sync::atomic::AtomicU64,
        /// Requests refused with 403.
        pub refused: std::sync::atomic::AtomicU64,
    }

    /// Sends a request on to the node; answers what the node answered.
    async fn forward(
        http: &reqwest::Client,
        upstream: &str,
        method: &axum::http::Method,
        uri: &axum::http::Uri,
        headers: &axum::http::HeaderMap,
        body: Vec<u8>,
    ) -> (axum::http::StatusCode, String) {
        use axum::http::StatusCode;
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut request = http.request(
            reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap_or(reqwest::Method::GET),
            format!("{upstream}{path}"),
        );
        if let Some(ct) = headers.get("content-type").and_then(|v| v.to_str().ok()) {
            request = request.header("content-type", ct);
        }
        match request.body(body).send().await {
            Ok(response) => {
                let status = StatusCode::from_u16(response.status().as_u16())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                (status, response.text().await.unwrap_or_default())
            }
            Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()),
        }
    }

    /// Serves `handler` on a free port of 127.0.0.1; returns its URL.
    async fn serve_proxy<H, T>(handler: H) -> Result<String>
    where
        H: axum::handler::Handler<T, ()>,
        T: 'static,
    {
        let app = axum::Router::new().fallback(handler);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(format!("http://{address}"))
    }

    /// What a [`capturing_server`] was sent: method, path and Authorization header of each request.
    pub type Captured = std::sync::Arc<std::sync::Mutex<Vec<(String, String, Option<String>)>>>;

    /// An HTTP server that stands for an OpenSearch endpoint of someone's choosing: it answers 404
    /// to everything (no such index) and records every request. Returns its URL.
    pub async fn capturing_server() -> Result<(String, Captured)> {
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        let seen: Captured = Default::default();
        let state = seen.clone();
        let handler = move |method: Method, uri: Uri, headers: HeaderMap| {
            let seen = state.clone();
            async move {
                let authorization = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                seen.lock().unwrap_or_else(|e| e.into_inner()).push((
                    method.to_string(),
                    uri.path().to_owned(),
                    authorization,
                ));
                (StatusCode::NOT_FOUND, "{}".to_owned())
            }
        };
        Ok((serve_proxy(handler).await?, seen))
    }

    /// A reverse proxy in front of the node that accepts only requests signed with SigV4 for
    /// `service` with the test credentials, as Amazon OpenSearch Service does. Returns its URL.
    pub async fn signing_proxy(
        service: &'static str,
    ) -> Result<(String, std::sync::Arc<ProxyCounts>)> {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        use std::sync::Arc;
        use std::sync::atomic::Ordering;
        let upstream = url()?;
        let counts = Arc::new(ProxyCounts::default());
        let http = reqwest::Client::new();
        let state = counts.clone();
        let handler = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (http, upstream, counts) = (http.clone(), upstream.clone(), state.clone());
            async move {
                if let Err(e) =
                    crate::bedrock::verify_sigv4(&method, &uri, &headers, &body, service)
                {
                    counts.refused.fetch_add(1, Ordering::SeqCst);
                    return (
                        StatusCode::FORBIDDEN,
                        serde_json::json!({"message": e}).to_string(),
                    );
                }
                counts.verified.fetch_add(1, Ordering::SeqCst);
                forward(&http, &upstream, &method, &uri, &headers, body.to_vec()).await
            }
        };
        Ok((serve_proxy(handler).await?, counts))
    }

    /// What a [`serverless_proxy`] refused.
    #[derive(Default)]
    pub struct ServerlessRefusals {
        /// Index or create actions that named an `_id`.
        pub custom_ids: std::sync::atomic::AtomicU64,
        /// Requests for an API a vector collection does not have (`_refresh`), or index
        /// settings it manages itself.
        pub unsupported: std::sync::atomic::AtomicU64,
        /// Requests signed right for `aoss`.
        pub verified: std::sync::atomic::AtomicU64,
    }

    /// A reverse proxy in front of the node that behaves like an OpenSearch Serverless vector
    /// collection where the worker can tell: requests must be signed with SigV4 for `aoss`; an
    /// index or create action (in `_bulk` or on `_doc/<id>`) that names an `_id` is refused
    /// with 400; `_refresh` does not exist; an index created with shard, replica or refresh
    /// settings is refused.
    pub async fn serverless_proxy() -> Result<(String, std::sync::Arc<ServerlessRefusals>)> {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        use serde_json::Value;
        use std::sync::Arc;
        use std::sync::atomic::Ordering;
        let upstream = url()?;
        let counts = Arc::new(ServerlessRefusals::default());
        let http = reqwest::Client::new();
        let state = counts.clone();
        let refuse = |reason: &str| {
            (
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": {"type": "illegal_argument_exception", "reason": reason}, "status": 400})
                    .to_string(),
            )
        };
        let handler = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (http, upstream, counts) = (http.clone(), upstream.clone(), state.clone());
            async move {
                if let Err(e) = crate::bedrock::verify_sigv4(&method, &uri, &headers, &body, "aoss")
                {
                    return (
                        StatusCode::FORBIDDEN,
                        serde_json::json!({"message": e}).to_string(),
                    );
                }
                counts.verified.fetch_add(1, Ordering::SeqCst);
                let path = uri.path();
                if path.contains("/_refresh") {
                    counts.unsupported.fetch_add(1, Ordering::SeqCst);
                    return (
                        StatusCode::NOT_FOUND,
                        r#"{"error":"Unsupported API for OpenSearch Serverless"}"#.to_owned(),
                    );
                }
                if path.contains("/_doc/") && (method == Method::PUT || method == Method::POST) {
                    counts.custom_ids.fetch_add(1, Ordering::SeqCst);
                    return refuse(
                        "Document ID is not supported in create/index operation request",
                    );
                }
                if method == Method::PUT && !path[1..].contains('/') {
                    let text = String::from_utf8_lossy(&body);
                    if ["number_of_shards", "number_of_replicas", "refresh_interval"]
                        .iter()
                        .any(|s| text.contains(s))
                    {
                        counts.unsupported.fetch_add(1, Ordering::SeqCst);
                        return refuse(
                            "index settings [number_of_shards, number_of_replicas, refresh_interval] are managed by OpenSearch Serverless",
                        );
                    }
                }
                if method == Method::POST && path.ends_with("/_bulk") {
                    let named = body
                        .split(|b| *b == b'\n')
                        .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
                        .any(|action| {
                            ["index", "create"]
                                .iter()
                                .any(|op| action.get(op).and_then(|a| a.get("_id")).is_some())
                        });
                    if named {
                        counts.custom_ids.fetch_add(1, Ordering::SeqCst);
                        return refuse(
                            "Document ID is not supported in create/index operation request",
                        );
                    }
                }
                forward(&http, &upstream, &method, &uri, &headers, body.to_vec()).await
            }
        };
        Ok((serve_proxy(handler).await?, counts))
    }

    /// A reverse proxy in front of the node that holds every `_bulk` request carrying index
    /// actions for `hold` before passing it on (a slow or stalled write of one worker); the
    /// counter says how many it held. Deletes and every other request pass at once.
    pub async fn holding_proxy(
        hold: Duration,
    ) -> Result<(String, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, Method, Uri};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let upstream = url()?;
        let held = Arc::new(AtomicU64::new(0));
        let http = reqwest::Client::new();
        let state = held.clone();
        let handler = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (http, upstream, held) = (http.clone(), upstream.clone(), state.clone());
            async move {
                let indexing = method == Method::POST
                    && uri.path().ends_with("/_bulk")
                    && body.windows(9).any(|w| w == br#"{"index":"#);
                if indexing {
                    held.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(hold).await;
                }
                forward(&http, &upstream, &method, &uri, &headers, body.to_vec()).await
            }
        };
        Ok((serve_proxy(handler).await?, held))
    }

    /// A reverse proxy in front of the node that answers 413 (as Amazon OpenSearch Service
    /// does above its HTTP size limit) to every `_bulk` request whose body holds `marker`; the
    /// counter says how many it refused. Everything else passes.
    pub async fn too_large_proxy(
        marker: &str,
    ) -> Result<(String, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let upstream = url()?;
        let refused = Arc::new(AtomicU64::new(0));
        let http = reqwest::Client::new();
        let state = refused.clone();
        let marker = marker.as_bytes().to_vec();
        let handler = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (http, upstream, refused, marker) = (
                http.clone(),
                upstream.clone(),
                state.clone(),
                marker.clone(),
            );
            async move {
                let bulk = method == Method::POST && uri.path().ends_with("/_bulk");
                if bulk && body.windows(marker.len()).any(|w| w == marker.as_slice()) {
                    refused.fetch_add(1, Ordering::SeqCst);
                    return (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        r#"{"Message":"Request size exceeded 10485760 bytes"}"#.to_owned(),
                    );
                }
                forward(&http, &upstream, &method, &uri, &headers, body.to_vec()).await
            }
        };
        Ok((serve_proxy(handler).await?, refused))
    }

    /// What a [`rejecting_proxy`] refused.
    #[derive(Default)]
    pub struct Rejections {
        /// Whole `_bulk` requests answered 429.
        pub requests: std::sync::atomic::AtomicU64,
        /// Single documents of `_bulk` requests answered 429 (not written).
        pub documents: std::sync::atomic::AtomicU64,
    }

    /// A reverse proxy in front of the node that pushes back like a node whose write queue is
    /// full: the first `requests` `_bulk` requests are answered 429 as a whole, then `documents`
    /// single documents (every other one of the following index requests) are not written and
    /// answered with an item status 429, the rest of their request is written. Returns its URL.
    pub async fn rejecting_proxy(
        requests: u64,
        documents: u64,
    ) -> Result<(String, std::sync::Arc<Rejections>)> {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        use serde_json::{Value, json};
        use std::sync::Arc;
        use std::sync::atomic::Ordering;
        let upstream = url()?;
        let counts = Arc::new(Rejections::default());
        let http = reqwest::Client::new();
        let state = counts.clone();
        let rejected = |id: &str| {
            json!({"index": {"_id": id, "status": 429, "error": {
                "type": "es_rejected_execution_exception",
                "reason": "rejected execution of primary operation [queue capacity = 200]"
            }}})
        };
        let handler = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (http, upstream, counts) = (http.clone(), upstream.clone(), state.clone());
            async move {
                let bulk = method == Method::POST && uri.path().ends_with("/_bulk");
                if !bulk {
                    return forward(&http, &upstream, &method, &uri, &headers, body.to_vec()).await;
                }
                if counts.requests.load(Ordering::SeqCst) < requests {
                    counts.requests.fetch_add(1, Ordering::SeqCst);
                    let error = json!({"error": {"type": "es_rejected_execution_exception",
                        "reason": "rejected execution of coordinating operation"}, "status": 429});
                    return (StatusCode::TOO_MANY_REQUESTS, error.to_string());
                }
                // Index requests only (action and document line pairs): drop every other
                // document while the budget lasts, and answer 429 in its place.
                let lines: Vec<&[u8]> = body
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .collect();
                let actions: Vec<Value> = lines
                    .iter()
                    .step_by(2)
                    .filter_map(|l| serde_json::from_slice(l).ok())
                    .collect();
                let all_index = lines.len().is_multiple_of(2)
                    && actions.len() * 2 == lines.len()
                    && actions.iter().all(|a| a.get("index").is_some());
                if !all_index || counts.documents.load(Ordering::SeqCst) >= documents {
                    return forward(&http, &upstream, &method, &uri, &headers, body.to_vec()).await;
                }
                let mut kept = Vec::new();
                let mut refused = Vec::new();
                for (n, pair) in lines.chunks(2).enumerate() {
                    let budget_left = counts.documents.load(Ordering::SeqCst) < documents;
                    if n % 2 == 1 && budget_left {
                        counts.documents.fetch_add(1, Ordering::SeqCst);
                        refused.push(n);
                    } else {
                        kept.extend_from_slice(pair[0]);
                        kept.push(b'\n');
                        kept.extend_from_slice(pair[1]);
                        kept.push(b'\n');
                    }
                }
                let (status, text) = if kept.is_empty() {
                    (
                        StatusCode::OK,
                        json!({"errors": false, "items": []}).to_string(),
                    )
                } else {
                    forward(&http, &upstream, &method, &uri, &headers, kept).await
                };
                let Ok(mut response) = serde_json::from_str::<Value>(&text) else {
                    return (status, text);
                };
                let mut written = response["items"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter();
                let items: Vec<Value> = (0..actions.len())
                    .map(|n| {
                        if refused.contains(&n) {
                            rejected(actions[n]["index"]["_id"].as_str().unwrap_or_default())
                        } else {
                            written.next().unwrap_or(Value::Null)
                        }
                    })
                    .collect();
                response["items"] = Value::Array(items);
                response["errors"] = Value::Bool(true);
                (status, response.to_string())
            }
        };
        Ok((serve_proxy(handler).await?, counts))
    }
}

/// Running the worker binary as a separate process, as a pod would.
pub mod worker {
    use super::*;
    use std::process::{Child, Stdio};

    /// A binary of the workspace next to the test binaries (`cargo build --bins` makes them).
    pub fn binary(name: &str) -> Result<PathBuf> {
        let exe = std::env::current_exe()?;
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .context("the test binary has no target directory")?;
        let path = dir.join(name);
        if !path.exists() {
            bail!(
                "{} does not exist; build it first with `cargo build --workspace --bins` (tests/run-all.sh does)",
                path.display()
            );
        }
        Ok(path)
    }

    /// The pipeline file of a worker process that stands in for the pods of pipeline `posts` in
    /// `namespace` (same name and namespace: the same consumer group): `topic` on the harness
    /// Kafka, Titan v2 at 256 dimensions from the fake Bedrock at `bedrock` (`host:port`), into
    /// the index `topic` on the harness OpenSearch with lucene and no replicas.
    pub fn posts_manifest(
        namespace: &str,
        topic: &str,
        bedrock: &str,
    ) -> Result<serde_json::Value> {
        Ok(serde_json::json!({
            "apiVersion": "vectorpipe.io/v1alpha1",
            "kind": "EmbeddingPipeline",
            "metadata": {"name": "posts", "namespace": namespace},
            "spec": {
                "source": {"kafka": {"bootstrapServers": [crate::kafka::bootstrap()?], "topics": [topic]}},
                "transform": {"idPointer": "/id", "textPointers": ["/text"]},
                "embedding": {"bedrock": {"modelId": "amazon.titan-embed-text-v2:0",
                    "dimensions": 256, "region": "eu-west-1",
                    "endpointUrl": format!("http://{bedrock}")}},
                "sink": {"opensearch": {"endpoints": [crate::opensearch::url()?], "index": topic.to_lowercase(),
                    "method": {"engine": "lucene"},
                    "indexSettings": {"shards": 1, "replicas": 0},
                    "bulk": {"flushInterval": "100ms"}}},
            }
        }))
    }

    /// A free port on 127.0.0.1 (bound and released).
    pub fn free_port() -> Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    }

    /// The text of `/metrics` at `address` (`host:port`).
    pub(crate) async fn scrape(http: &reqwest::Client, address: &str) -> Result<String> {
        let url = format!("http://{address}/metrics");
        Ok(http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// A running worker; killed (SIGKILL) when dropped if still running.
    pub struct Worker {
        child: Child,
        /// Where its logs go.
        pub log: PathBuf,
        /// Its metrics address.
        pub metrics: String,
        /// The client of its `/metrics` scrapes, built once: `reqwest::get` builds a client a
        /// call, which reads the system's root certificates from disk each time (in the worker
        /// bench's profile, scraping every 50 ms showed as a few per cent of the machine).
        http: reqwest::Client,
    }

    impl Worker {
        /// Starts `vectorpipe-worker run` on a pipeline file, with the fake Bedrock credentials.
        pub fn start(pipeline: &Path, log: &Path) -> Result<Self> {
            Self::start_binary(&binary("vectorpipe-worker")?, pipeline, log)
        }

        /// The process id.
        pub fn pid(&self) -> u32 {
            self.child.id()
        }

        /// Like [`Worker::start`], with extra environment variables (credentials a pod would
        /// get from Secrets).
        pub fn start_with_env(pipeline: &Path, log: &Path, env: &[(&str, &str)]) -> Result<Self> {
            Self::spawn(&binary("vectorpipe-worker")?, pipeline, log, env)
        }

        /// Like [`Worker::start_with_env`], with a given worker binary.
        pub fn start_with_env_binary(
            worker: &Path,
            pipeline: &Path,
            log: &Path,
            env: &[(&str, &str)],
        ) -> Result<Self> {
            Self::spawn(worker, pipeline, log, env)
        }

        /// Like [`Worker::start`], with a given worker binary (e.g. a release build).
        pub fn start_binary(worker: &Path, pipeline: &Path, log: &Path) -> Result<Self> {
            Self::spawn(worker, pipeline, log, &[])
        }

        /// Starts `vectorpipe-worker serve` (the query server) on a pipeline file; its address
        /// is [`Worker::metrics`].
        pub fn serve(pipeline: &Path, log: &Path, env: &[(&str, &str)]) -> Result<Self> {
            Self::serve_binary(&binary("vectorpipe-worker")?, pipeline, log, env)
        }

        /// Like [`Worker::serve`], with a given worker binary (e.g. a release build).
        pub fn serve_binary(
            worker: &Path,
            pipeline: &Path,
            log: &Path,
            env: &[(&str, &str)],
        ) -> Result<Self> {
            let args = ["serve", "--address", "127.0.0.1:0", "--log-format", "text"];
            Self::spawn_with(worker, &args, "serving searches", pipeline, log, env)
        }

        fn spawn(worker: &Path, pipeline: &Path, log: &Path, env: &[(&str, &str)]) -> Result<Self> {
            let args = [
                "run",
                "--metrics-address",
                "127.0.0.1:0",
                "--drain-seconds",
                "20",
            ];
            Self::spawn_with(worker, &args, "\"starting\"", pipeline, log, env)
        }

        /// Starts the worker listening on a port it picks itself (a port picked here and
        /// released could be taken by another process before the worker binds it); its address
        /// is read from the log line that holds `marker`.
        fn spawn_with(
            worker: &Path,
            args: &[&str],
            marker: &str,
            pipeline: &Path,
            log: &Path,
            env: &[(&str, &str)],
        ) -> Result<Self> {
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)?;
            let offset = out.metadata()?.len();
            let mut child = Command::new(worker)
                .args(args)
                .arg("--pipeline")
                .arg(pipeline)
                .env("AWS_ACCESS_KEY_ID", crate::bedrock::ACCESS_KEY_ID)
                .env("AWS_SECRET_ACCESS_KEY", crate::bedrock::SECRET_ACCESS_KEY)
                .env("AWS_REGION", "eu-west-1")
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .env("RUST_LOG", "info")
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(out)
                .spawn()?;
            let metrics = bound_address(&mut child, log, offset, marker)?;
            Ok(Self {
                child,
                log: log.to_owned(),
                metrics,
                http: reqwest::Client::new(),
            })
        }

        /// Sends SIGTERM and waits for the exit status.
        pub fn stop(mut self) -> Result<std::process::ExitStatus> {
            let status = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status()?;
            ensure_ok(status.success(), "kill -TERM failed")?;
            Ok(self.child.wait()?)
        }

        /// SIGKILL, as a crash.
        pub fn kill(mut self) -> Result<()> {
            self.child.kill()?;
            self.child.wait()?;
            Ok(())
        }

        /// Fails if the worker exited; returns its log otherwise.
        pub fn assert_running(&mut self) -> Result<()> {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the worker exited with {status}; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            Ok(())
        }

        /// The exit status once the worker exited, `None` while it runs.
        pub fn try_exit(&mut self) -> Result<Option<std::process::ExitStatus>> {
            Ok(self.child.try_wait()?)
        }

        /// The text of `/metrics`.
        pub async fn metrics_text(&self) -> Result<String> {
            scrape(&self.http, &self.metrics).await
        }
    }

    /// The `127.0.0.1:<port>` on the first line after `offset` of `log` that holds `marker`,
    /// waiting up to 60 s; a worker that exits first (a test of a failing start) gets
    /// `127.0.0.1:0`, which nothing answers.
    fn bound_address(child: &mut Child, log: &Path, offset: u64, marker: &str) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read(log).unwrap_or_default();
            let text = String::from_utf8_lossy(&text[(offset as usize).min(text.len())..]);
            let found = text
                .lines()
                .filter(|l| l.contains(marker))
                .find_map(|line| {
                    let at = line.find("127.0.0.1:")? + "127.0.0.1:".len();
                    let port: String = line[at..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    (!port.is_empty()).then(|| format!("127.0.0.1:{port}"))
                });
            if let Some(address) = found {
                return Ok(address);
            }
            if child.try_wait()?.is_some() {
                return Ok("127.0.0.1:0".to_owned());
            }
            if Instant::now() > deadline {
                bail!(
                    "the worker logged no {marker} line with its address in 60 s: {}",
                    text.chars().take(2000).collect::<String>()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sums every sample of a metric in a Prometheus text page (all label sets).
    pub fn metric_sum(page: &str, name: &str) -> f64 {
        page.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn ensure_ok(ok: bool, what: &str) -> Result<()> {
        if ok { Ok(()) } else { bail!("{what}") }
    }

    impl Drop for Worker {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Running the operator as a process against the harness cluster.
pub mod operator {
    use super::*;
    use std::process::{Child, Stdio};

    /// A running operator; killed when dropped.
    pub struct Operator {
        child: Child,
        /// Its log file.
        pub log: PathBuf,
        /// Its metrics address.
        pub metrics: String,
        /// The client of its `/metrics` scrapes, built once (see `Worker`).
        http: reqwest::Client,
    }

    impl Operator {
        /// Starts `vectorpipe-operator run` with the harness admin kubeconfig and its own Lease.
        pub fn start(log: &Path) -> Result<Self> {
            Self::start_with(log, &crate::k8s::kubeconfig()?, &unique_name("lease"))
        }

        /// Starts the operator with a kubeconfig and a leader Lease name of the test's choosing.
        pub fn start_with(log: &Path, kubeconfig: &Path, lease: &str) -> Result<Self> {
            Self::start_binary(
                &crate::worker::binary("vectorpipe-operator")?,
                log,
                kubeconfig,
                lease,
            )
        }

        /// The process id.
        pub fn pid(&self) -> u32 {
            self.child.id()
        }

        /// Like [`Operator::start_with`], with a given operator binary (e.g. a release build).
        pub fn start_binary(
            operator: &Path,
            log: &Path,
            kubeconfig: &Path,
            lease: &str,
        ) -> Result<Self> {
            Self::start_full(operator, log, kubeconfig, "default", lease, &[])
        }

        /// Like [`Operator::start_in`], watching only `namespaces` (the chart's
        /// `watchNamespaces`).
        pub fn start_watching(
            log: &Path,
            kubeconfig: &Path,
            lease_namespace: &str,
            lease: &str,
            namespaces: &[&str],
        ) -> Result<Self> {
            Self::start_full(
                &crate::worker::binary("vectorpipe-operator")?,
                log,
                kubeconfig,
                lease_namespace,
                lease,
                namespaces,
            )
        }

        /// The operator with its leader Lease in `lease_namespace` (as the Helm chart runs it),
        /// watching every namespace.
        pub fn start_in(
            log: &Path,
            kubeconfig: &Path,
            lease_namespace: &str,
            lease: &str,
        ) -> Result<Self> {
            Self::start_watching(log, kubeconfig, lease_namespace, lease, &[])
        }

        fn start_full(
            operator: &Path,
            log: &Path,
            kubeconfig: &Path,
            lease_namespace: &str,
            lease: &str,
            watch: &[&str],
        ) -> Result<Self> {
            let metrics = format!("127.0.0.1:{}", crate::worker::free_port()?);
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)?;
            let mut command = Command::new(operator);
            // The harness Prometheus is the default server for ScalingPolicies, when it runs.
            if let Ok(url) = std::env::var("VP_PROMETHEUS_URL") {
                command.env("VECTORPIPE_PROMETHEUS_URL", url);
            }
            let child = command
                .args(["run", "--metrics-address", &metrics, "--log-format", "text"])
                .args(["--lease-name", lease, "--lease-namespace", lease_namespace])
                .args(["--watch-namespaces", &watch.join(",")])
                .env("KUBECONFIG", kubeconfig)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(out)
                .spawn()?;
            Ok(Self {
                child,
                log: log.to_owned(),
                metrics,
                http: reqwest::Client::new(),
            })
        }

        /// Waits up to `limit` for the process to exit by itself; None if it still runs.
        pub fn wait_exit(
            &mut self,
            limit: std::time::Duration,
        ) -> Result<Option<std::process::ExitStatus>> {
            let deadline = std::time::Instant::now() + limit;
            loop {
                if let Some(status) = self.child.try_wait()? {
                    return Ok(Some(status));
                }
                if std::time::Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }

        /// The operator's log so far.
        pub fn log_text(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }

        /// True once the process has exited.
        pub fn exited(&mut self) -> Result<bool> {
            Ok(self.child.try_wait()?.is_some())
        }

        /// The text of its `/metrics`.
        pub async fn metrics_text(&self) -> Result<String> {
            crate::worker::scrape(&self.http, &self.metrics).await
        }

        /// SIGKILL.
        pub fn kill(mut self) -> Result<()> {
            self.child.kill()?;
            self.child.wait()?;
            Ok(())
        }
    }

    impl Drop for Operator {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
