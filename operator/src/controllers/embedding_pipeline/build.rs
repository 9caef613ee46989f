//! From a valid pipeline to the objects that run it. Pure: no client, table-tested.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    ExecAction, KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceFieldSelector, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use sha2::{Digest, Sha256};
use vectorpipe_crds::v1alpha1::{EmbeddingPipeline, ImagePullPolicy, SecretKeyRef};

use crate::labels::{
    CONFIG_HASH_ANNOTATION, PIPELINE_FILE, PIPELINE_LABEL, PIPELINE_MOUNT, QUERY_NAME,
    WORKER_DRAIN_SECONDS, WORKER_NAME,
};

/// Where the worker image has its binary (worker/Dockerfile).
const WORKER_BINARY: &str = "/usr/local/bin/vectorpipe-worker";

/// The worker's admin socket, in the pod's scratch directory: the probes ask it, so they need no
/// TCP port and worker pods on the host network never clash on one.
const WORKER_SOCKET: &str = "/tmp/vectorpipe-worker.sock";

/// Settings of the operator that shape the children.
#[derive(Clone, Debug)]
pub struct Defaults {
    /// The worker image when the spec names none.
    pub worker_image: String,
}

/// Everything one pipeline runs on.
#[derive(Clone, Debug)]
pub struct Children {
    /// The rendered pipeline file.
    pub config_map: ConfigMap,
    /// The workers.
    pub deployment: Deployment,
    /// The metrics endpoint.
    pub service: Service,
    /// Present when more than one worker runs.
    pub pdb: Option<PodDisruptionBudget>,
    /// The query server (`spec.query.enabled`): its Deployment and Service.
    pub query: Option<(Deployment, Service)>,
    /// Their name (deleted under it when the query server is disabled).
    pub query_name: String,
}

/// The name of the query server's Deployment and Service.
pub fn query_name(pipeline: &EmbeddingPipeline) -> String {
    format!(
        "{}-query",
        pipeline.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The labels that select a pipeline's query server pods.
pub fn query_selector_labels(pipeline: &EmbeddingPipeline) -> BTreeMap<String, String> {
    let name = pipeline.metadata.name.clone().unwrap_or_default();
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), QUERY_NAME.to_owned()),
        ("app.kubernetes.io/instance".to_owned(), name.clone()),
        (PIPELINE_LABEL.to_owned(), name),
    ])
}

/// Environment variables only the worker reads.
const WORKER_ONLY_ENV: [&str; 3] = [
    "VECTORPIPE_METRICS_ADDRESS",
    "VECTORPIPE_DRAIN_SECONDS",
    "VECTORPIPE_MEMORY_REQUEST_BYTES",
];

/// The name of every child object.
pub fn child_name(pipeline: &EmbeddingPipeline) -> String {
    format!(
        "{}-worker",
        pipeline.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The labels that select a pipeline's worker pods.
pub fn selector_labels(pipeline: &EmbeddingPipeline) -> BTreeMap<String, String> {
    let name = pipeline.metadata.name.clone().unwrap_or_default();
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), WORKER_NAME.to_owned()),
        ("app.kubernetes.io/instance".to_owned(), name.clone()),
        (PIPELINE_LABEL.to_owned(), name),
    ])
}

/// The selector as a string, for the scale subresource.
pub fn selector_string(pipeline: &EmbeddingPipeline) -> String {
    selector_labels(pipeline)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn labels(pipeline: &EmbeddingPipeline) -> BTreeMap<String, String> {
    let mut labels = selector_labels(pipeline);
    labels.insert("app.kubernetes.io/component".into(), "worker".into());
    labels.insert("app.kubernetes.io/part-of".into(), "vectorpipe".into());
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "vectorpipe-operator".into(),
    );
    labels
}

fn owner(pipeline: &EmbeddingPipeline) -> OwnerReference {
    OwnerReference {
        api_version: EmbeddingPipeline::api_version(&()).into_owned(),
        kind: EmbeddingPipeline::kind(&()).into_owned(),
        name: pipeline.metadata.name.clone().unwrap_or_default(),
        uid: pipeline.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn meta(pipeline: &EmbeddingPipeline) -> ObjectMeta {
    ObjectMeta {
        name: Some(child_name(pipeline)),
        namespace: pipeline.metadata.namespace.clone(),
        labels: Some(labels(pipeline)),
        owner_references: Some(vec![owner(pipeline)]),
        ..ObjectMeta::default()
    }
}

/// The pipeline file the worker reads: the manifest with its spec, without status, server-managed
/// metadata, or the parts only the operator uses. `suspend` and `workers` (replicas, image, pod
/// settings, the user's environment) and `query` stay out, so a scale never changes the file or the pod
/// template's hash (pods are added or removed, never replaced), and literal environment values
/// never land in the ConfigMap. Of `workers` the worker reads its log level and metrics port.
/// Secrets are never in it, only references.
pub fn render_config(pipeline: &EmbeddingPipeline) -> Result<String, serde_yaml::Error> {
    let spec = &pipeline.spec;
    let mut rendered = serde_yaml::to_value(spec)?;
    if let serde_yaml::Value::Mapping(fields) = &mut rendered {
        fields.remove("suspend");
        // The query server's settings are the operator's: a change of them must not roll the
        // workers.
        fields.remove("query");
        // The budget is the operator's too; what it changes (suspend, the throttle rate) is
        // rendered into the spec before this.
        fields.remove("budget");
        // So are the migration settings.
        fields.remove("migration");
        let mut workers = serde_yaml::Mapping::new();
        workers.insert("logLevel".into(), spec.workers.log_level.clone().into());
        workers.insert("metricsPort".into(), spec.workers.metrics_port.into());
        fields.insert("workers".into(), workers.into());
    }
    let manifest = serde_json::json!({
        "apiVersion": EmbeddingPipeline::api_version(&()),
        "kind": EmbeddingPipeline::kind(&()),
        "metadata": {
            "name": pipeline.metadata.name,
            "namespace": pipeline.metadata.namespace,
        },
        "spec": rendered,
    });
    serde_yaml::to_string(&manifest)
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: key.to_owned(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn plain_env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// Secret files mounted into the worker: (volume name, secret name, items, mount path).
struct SecretMount {
    volume: &'static str,
    secret: String,
    items: Vec<(String, String)>,
    path: &'static str,
}

fn ca_mount(volume: &'static str, path: &'static str, r: &SecretKeyRef) -> SecretMount {
    SecretMount {
        volume,
        secret: r.name.clone(),
        items: vec![(r.key.clone(), "ca.crt".into())],
        path,
    }
}

/// Sets an environment variable of the worker container (added, or its value replaced).
pub fn set_env(deployment: &mut Deployment, name: &str, value: &str) {
    let Some(pod) = deployment.spec.template.spec.as_mut() else {
        return;
    };
    for container in &mut pod.containers {
        let env = container.env.get_or_insert_with(Vec::new);
        match env.iter_mut().find(|e| e.name == name) {
            Some(existing) => {
                existing.value = Some(value.to_owned());
                existing.value_from = None;
            }
            None => env.push(plain_env(name, value)),
        }
    }
}

/// Builds every child of a pipeline. Fails only when the spec cannot be written as YAML.
pub fn build(
    pipeline: &EmbeddingPipeline,
    defaults: &Defaults,
) -> Result<Children, serde_yaml::Error> {
    let spec = &pipeline.spec;
    let name = pipeline.metadata.name.clone().unwrap_or_default();
    let namespace = pipeline.metadata.namespace.clone().unwrap_or_default();
    let config = render_config(pipeline)?;
    let hash = hex::encode(&Sha256::digest(config.as_bytes())[..16]);

    let mut env = vec![
        plain_env(
            "VECTORPIPE_PIPELINE_FILE",
            format!("{PIPELINE_MOUNT}/{PIPELINE_FILE}"),
        ),
        plain_env("VECTORPIPE_PIPELINE_NAME", name.clone()),
        plain_env("VECTORPIPE_PIPELINE_NAMESPACE", namespace),
        plain_env(
            "VECTORPIPE_METRICS_ADDRESS",
            format!("0.0.0.0:{}", spec.workers.metrics_port),
        ),
        plain_env("VECTORPIPE_ADMIN_SOCKET", WORKER_SOCKET),
        plain_env("VECTORPIPE_DRAIN_SECONDS", WORKER_DRAIN_SECONDS.to_string()),
        plain_env("VECTORPIPE_LOG_FORMAT", "json"),
        // The worker bounds the bytes its records in flight hold by a quarter of this.
        EnvVar {
            name: "VECTORPIPE_MEMORY_REQUEST_BYTES".into(),
            value_from: Some(EnvVarSource {
                resource_field_ref: Some(ResourceFieldSelector {
                    container_name: Some("worker".into()),
                    resource: "requests.memory".into(),
                    ..ResourceFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
    ];
    let mut mounts: Vec<SecretMount> = Vec::new();
    if let Some(auth) = &spec.source.kafka.auth {
        if let Some(tls) = &auth.tls {
            if let Some(ca) = &tls.ca_secret_ref {
                mounts.push(ca_mount("kafka-ca", "/etc/vectorpipe/kafka-ca", ca));
                env.push(plain_env(
                    "VECTORPIPE_KAFKA_CA_FILE",
                    "/etc/vectorpipe/kafka-ca/ca.crt",
                ));
            }
            if let Some(cert) = &tls.client_cert_secret_ref {
                mounts.push(SecretMount {
                    volume: "kafka-client",
                    secret: cert.name.clone(),
                    items: vec![
                        ("tls.crt".into(), "tls.crt".into()),
                        ("tls.key".into(), "tls.key".into()),
                    ],
                    path: "/etc/vectorpipe/kafka-client",
                });
                env.push(plain_env(
                    "VECTORPIPE_KAFKA_CERT_FILE",
                    "/etc/vectorpipe/kafka-client/tls.crt",
                ));
                env.push(plain_env(
                    "VECTORPIPE_KAFKA_KEY_FILE",
                    "/etc/vectorpipe/kafka-client/tls.key",
                ));
            }
        }
        if let Some(scram) = &auth.scram {
            env.push(secret_env(
                "VECTORPIPE_KAFKA_USERNAME",
                &scram.secret_ref.name,
                "username",
            ));
            env.push(secret_env(
                "VECTORPIPE_KAFKA_PASSWORD",
                &scram.secret_ref.name,
                "password",
            ));
            if let Some(ca) = &scram.ca_secret_ref {
                mounts.push(ca_mount("kafka-ca", "/etc/vectorpipe/kafka-ca", ca));
                env.push(plain_env(
                    "VECTORPIPE_KAFKA_CA_FILE",
                    "/etc/vectorpipe/kafka-ca/ca.crt",
                ));
            }
        }
    }
    let sink = &spec.sink.opensearch;
    if let Some(basic) = sink.auth.as_ref().and_then(|a| a.basic.as_ref()) {
        env.push(secret_env(
            "VECTORPIPE_OPENSEARCH_USERNAME",
            &basic.secret_ref.name,
            "username",
        ));
        env.push(secret_env(
            "VECTORPIPE_OPENSEARCH_PASSWORD",
            &basic.secret_ref.name,
            "password",
        ));
    }
    if let Some(ca) = sink.tls.as_ref().and_then(|t| t.ca_secret_ref.as_ref()) {
        mounts.push(ca_mount(
            "opensearch-ca",
            "/etc/vectorpipe/opensearch-ca",
            ca,
        ));
        env.push(plain_env(
            "VECTORPIPE_OPENSEARCH_CA_FILE",
            "/etc/vectorpipe/opensearch-ca/ca.crt",
        ));
    }
    if let Some(region) = &spec.embedding.bedrock.region {
        env.push(plain_env("AWS_REGION", region.clone()));
    }
    // The user's own variables come last so they can override ours on purpose.
    let operator_env = env.clone();
    env.extend(spec.workers.env.iter().cloned());

    let mut volumes = vec![
        Volume {
            name: "pipeline".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: child_name(pipeline),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(Default::default()),
            ..Volume::default()
        },
    ];
    let mut volume_mounts = vec![
        VolumeMount {
            name: "pipeline".into(),
            mount_path: PIPELINE_MOUNT.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    ];
    for m in mounts {
        volumes.push(Volume {
            name: m.volume.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(m.secret),
                items: Some(
                    m.items
                        .into_iter()
                        .map(|(key, path)| KeyToPath {
                            key,
                            path,
                            ..KeyToPath::default()
                        })
                        .collect(),
                ),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        volume_mounts.push(VolumeMount {
            name: m.volume.into(),
            mount_path: m.path.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }

    // `vectorpipe-worker probe` asks the running worker over its admin socket and exits 0 on a
    // 200 (its output, the worker's reasons, lands in the probe's event).
    let probe = |path: &str, period: i32| Probe {
        exec: Some(ExecAction {
            command: Some(vec![
                WORKER_BINARY.into(),
                "probe".into(),
                path.into(),
                "--timeout-seconds".into(),
                "2".into(),
            ]),
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    let container = Container {
        name: "worker".into(),
        image: Some(
            spec.workers
                .image
                .clone()
                .unwrap_or_else(|| defaults.worker_image.clone()),
        ),
        image_pull_policy: spec.workers.image_pull_policy.map(|p| {
            match p {
                ImagePullPolicy::Always => "Always",
                ImagePullPolicy::IfNotPresent => "IfNotPresent",
                ImagePullPolicy::Never => "Never",
            }
            .to_owned()
        }),
        args: Some(vec!["run".into()]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: spec.workers.metrics_port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: spec.workers.resources.clone(),
        liveness_probe: Some(probe("/healthz", 10)),
        readiness_probe: Some(probe("/readyz", 5)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(volume_mounts),
        ..Container::default()
    };

    let mut pod_labels = spec.workers.pod_labels.clone();
    pod_labels.extend(labels(pipeline));
    let mut pod_annotations = spec.workers.pod_annotations.clone();
    pod_annotations.insert(CONFIG_HASH_ANNOTATION.into(), hash);
    let replicas = if spec.suspend {
        0
    } else {
        spec.workers.replicas
    };
    let empty_to_none = |m: &BTreeMap<String, String>| (!m.is_empty()).then(|| m.clone());

    let deployment = Deployment {
        metadata: meta(pipeline),
        spec: DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(pipeline)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: spec.workers.service_account_name.clone(),
                    // The worker never calls the Kubernetes API: no token in its pods.
                    automount_service_account_token: Some(false),
                    termination_grace_period_seconds: Some(WORKER_DRAIN_SECONDS + 20),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    node_selector: empty_to_none(&spec.workers.node_selector),
                    tolerations: (!spec.workers.tolerations.is_empty())
                        .then(|| spec.workers.tolerations.clone()),
                    affinity: spec.workers.affinity.clone(),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    };

    let service = Service {
        metadata: meta(pipeline),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(pipeline)),
            ports: Some(vec![ServicePort {
                name: Some("metrics".into()),
                port: spec.workers.metrics_port,
                target_port: Some(IntOrString::String("metrics".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };

    let config_map = ConfigMap {
        metadata: meta(pipeline),
        data: Some(BTreeMap::from([(PIPELINE_FILE.to_owned(), config)])),
        ..ConfigMap::default()
    };

    let pdb = (replicas > 1).then(|| PodDisruptionBudget {
        metadata: meta(pipeline),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(pipeline)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    });

    let query = spec
        .query
        .enabled
        .then(|| build_query(pipeline, &deployment, &operator_env));

    Ok(Children {
        config_map,
        deployment,
        service,
        pdb,
        query,
        query_name: query_name(pipeline),
    })
}

/// The query server: the workers' pod (the same image, pipeline file, credentials, security
/// context and ServiceAccount) running `serve` on `spec.query.port`, and a Service for it.
/// `own_env` is the operator's part of the workers' environment (the user's comes after).
fn build_query(
    pipeline: &EmbeddingPipeline,
    workers: &Deployment,
    own_env: &[EnvVar],
) -> (Deployment, Service) {
    let spec = &pipeline.spec;
    let query = &spec.query;
    let mut env: Vec<EnvVar> = own_env
        .iter()
        .filter(|e| !WORKER_ONLY_ENV.contains(&e.name.as_str()))
        .cloned()
        .collect();
    env.push(plain_env(
        "VECTORPIPE_QUERY_ADDRESS",
        format!("0.0.0.0:{}", query.port),
    ));
    if let Some(model) = &query.llm_model_id {
        env.push(plain_env("VECTORPIPE_LLM_MODEL_ID", model.clone()));
    }
    if let Some(token) = &query.auth_secret_ref {
        env.push(secret_env(
            "VECTORPIPE_QUERY_TOKEN",
            &token.name,
            &token.key,
        ));
    }
    env.extend(spec.workers.env.iter().cloned());

    let mut labels = query_selector_labels(pipeline);
    labels.insert("app.kubernetes.io/component".into(), "query".into());
    labels.insert("app.kubernetes.io/part-of".into(), "vectorpipe".into());
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "vectorpipe-operator".into(),
    );
    let meta = ObjectMeta {
        name: Some(query_name(pipeline)),
        namespace: pipeline.metadata.namespace.clone(),
        labels: Some(labels.clone()),
        owner_references: Some(vec![owner(pipeline)]),
        ..ObjectMeta::default()
    };

    let mut deployment = workers.clone();
    deployment.metadata = meta.clone();
    let deployment_spec = &mut deployment.spec;
    deployment_spec.replicas = Some(query.replicas);
    deployment_spec.selector = LabelSelector {
        match_labels: Some(query_selector_labels(pipeline)),
        ..LabelSelector::default()
    };
    let template = &mut deployment_spec.template;
    if let Some(metadata) = template.metadata.as_mut() {
        let mut pod_labels = spec.workers.pod_labels.clone();
        pod_labels.extend(labels);
        metadata.labels = Some(pod_labels);
    }
    if let Some(pod) = template.spec.as_mut() {
        pod.termination_grace_period_seconds = Some(30);
        if let Some(container) = pod.containers.first_mut() {
            container.name = "query".into();
            container.args = Some(vec!["serve".into()]);
            container.env = Some(env);
            container.resources = query.resources.clone();
            container.ports = Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: query.port,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]);
        }
    }

    let service = Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            selector: Some(query_selector_labels(pipeline)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: query.port,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    (deployment, service)
}

/// The Secrets a pipeline references, with the keys it reads from each.
pub fn referenced_secrets(pipeline: &EmbeddingPipeline) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut add = |name: &str, keys: &[&str]| {
        out.push((
            name.to_owned(),
            keys.iter().map(|k| (*k).to_owned()).collect(),
        ));
    };
    let spec = &pipeline.spec;
    if let Some(auth) = &spec.source.kafka.auth {
        if let Some(tls) = &auth.tls {
            if let Some(ca) = &tls.ca_secret_ref {
                add(&ca.name, &[ca.key.as_str()]);
            }
            if let Some(cert) = &tls.client_cert_secret_ref {
                add(&cert.name, &["tls.crt", "tls.key"]);
            }
        }
        if let Some(scram) = &auth.scram {
            add(&scram.secret_ref.name, &["username", "password"]);
            if let Some(ca) = &scram.ca_secret_ref {
                add(&ca.name, &[ca.key.as_str()]);
            }
        }
    }
    let sink = &spec.sink.opensearch;
    if let Some(basic) = sink.auth.as_ref().and_then(|a| a.basic.as_ref()) {
        add(&basic.secret_ref.name, &["username", "password"]);
    }
    if let Some(ca) = sink.tls.as_ref().and_then(|t| t.ca_secret_ref.as_ref()) {
        add(&ca.name, &[ca.key.as_str()]);
    }
    if let Some(token) = spec
        .query
        .auth_secret_ref
        .as_ref()
        .filter(|_| spec.query.enabled)
    {
        add(&token.name, &[token.key.as_str()]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pipeline(extra: serde_json::Value) -> EmbeddingPipeline {
        EmbeddingPipeline::test("posts")
            .with_metadata(json!({"uid": "u-1", "generation": 3}))
            .with_spec(extra)
            .build()
    }

    fn defaults() -> Defaults {
        Defaults {
            worker_image: "ghcr.io/vectorpipe/worker:test".into(),
        }
    }

    fn container(children: &Children) -> &Container {
        &children
            .deployment
            .spec
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
    }

    fn env<'a>(c: &'a Container, name: &str) -> Option<&'a EnvVar> {
        c.env.as_ref().unwrap().iter().find(|e| e.name == name)
    }

    #[test]
    fn children_are_owned_labelled_and_named_after_the_pipeline() {
        let children = build(&pipeline(json!({})), &defaults()).unwrap();
        for meta in [
            &children.config_map.metadata,
            &children.deployment.metadata,
            &children.service.metadata,
        ] {
            assert_eq!(meta.name.as_deref(), Some("posts-worker"));
            assert_eq!(meta.namespace.as_deref(), Some("data"));
            let owner = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
                ("EmbeddingPipeline", "u-1", Some(true))
            );
            assert_eq!(meta.labels.as_ref().unwrap()[PIPELINE_LABEL], "posts");
        }
        assert!(children.pdb.is_none(), "one replica needs no PDB");
        assert_eq!(
            selector_string(&pipeline(json!({}))),
            "app.kubernetes.io/instance=posts,app.kubernetes.io/name=vectorpipe-worker,vectorpipe.io/pipeline=posts"
        );
    }

    #[test]
    fn the_deployment_runs_the_worker_restricted_and_probed() {
        let children = build(&pipeline(json!({})), &defaults()).unwrap();
        let spec = &children.deployment.spec;
        assert_eq!(spec.replicas, Some(1));
        let pod = spec.template.spec.as_ref().unwrap();
        assert!(pod.termination_grace_period_seconds.unwrap() > WORKER_DRAIN_SECONDS);
        let c = container(&children);
        assert_eq!(c.image.as_deref(), Some("ghcr.io/vectorpipe/worker:test"));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
        // The probes ask the worker over its socket: no TCP port needed.
        let command = |probe: &Option<Probe>| {
            probe
                .as_ref()
                .and_then(|p| p.exec.as_ref())
                .and_then(|e| e.command.clone())
                .unwrap_or_default()
        };
        assert_eq!(
            command(&c.readiness_probe)[..3],
            [WORKER_BINARY, "probe", "/readyz"]
        );
        assert_eq!(
            command(&c.liveness_probe)[..3],
            [WORKER_BINARY, "probe", "/healthz"]
        );
        assert_eq!(
            env(c, "VECTORPIPE_ADMIN_SOCKET").and_then(|e| e.value.as_deref()),
            Some(WORKER_SOCKET)
        );
        let scratch = c.volume_mounts.as_ref().unwrap();
        assert!(scratch.iter().any(|m| m.mount_path == "/tmp"));
        assert_eq!(
            env(c, "AWS_REGION").and_then(|e| e.value.as_deref()),
            Some("eu-west-1")
        );
    }

    #[test]
    fn suspend_scales_to_zero_and_replicas_above_one_add_a_pdb() {
        let suspended = build(
            &pipeline(json!({"suspend": true, "workers": {"replicas": 4}})),
            &defaults(),
        )
        .unwrap();
        assert_eq!(suspended.deployment.spec.replicas, Some(0));
        assert!(suspended.pdb.is_none());
        let scaled = build(&pipeline(json!({"workers": {"replicas": 3}})), &defaults()).unwrap();
        assert_eq!(scaled.deployment.spec.replicas, Some(3));
        assert!(scaled.pdb.is_some());
    }

    #[test]
    fn any_spec_change_changes_the_config_hash() {
        let hash = |p: &EmbeddingPipeline| {
            build(p, &defaults())
                .unwrap()
                .deployment
                .spec
                .template
                .metadata
                .unwrap()
                .annotations
                .unwrap()[CONFIG_HASH_ANNOTATION]
                .clone()
        };
        let a = pipeline(json!({}));
        let mut b = a.clone();
        b.spec.sink.opensearch.index = "other".into();
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(hash(&a), hash(&a.clone()));
    }

    #[test]
    fn scaling_and_suspending_keep_the_pod_template_and_the_worker_file() {
        // A scale (policy, kubectl, Argo CD) must only add or remove pods: the pod template (and
        // so the ReplicaSet) and the worker's file stay byte for byte the same.
        let one = build(&pipeline(json!({"workers": {"replicas": 1}})), &defaults()).unwrap();
        let three = build(&pipeline(json!({"workers": {"replicas": 3}})), &defaults()).unwrap();
        let suspended = build(
            &pipeline(json!({"suspend": true, "workers": {"replicas": 3}})),
            &defaults(),
        )
        .unwrap();
        for other in [&three, &suspended] {
            assert_eq!(other.deployment.spec.template, one.deployment.spec.template);
            assert_eq!(other.config_map.data, one.config_map.data);
        }
        assert_eq!(three.deployment.spec.replicas, Some(3));
        assert_eq!(suspended.deployment.spec.replicas, Some(0));
    }

    #[test]
    fn the_query_server_runs_serve_beside_the_workers_without_touching_them() {
        let plain = build(&pipeline(json!({})), &defaults()).unwrap();
        assert!(plain.query.is_none());
        assert_eq!(plain.query_name, "posts-query");
        let p = pipeline(json!({
            "sink": {"opensearch": {"endpoints": ["https://os:9200"], "index": "posts",
                "auth": {"basic": {"secretRef": {"name": "os-basic"}}}}},
            "workers": {"env": [{"name": "EXTRA", "value": "1"}]},
            "query": {"enabled": true, "replicas": 2, "port": 8081,
                "llmModelId": "anthropic.claude-3-5-haiku-20241022-v1:0",
                "authSecretRef": {"name": "query-token"}}
        }));
        let children = build(&p, &defaults()).unwrap();
        // Enabling the query server leaves the workers' template and file as they were.
        let without = build(
            &pipeline(json!({
                "sink": {"opensearch": {"endpoints": ["https://os:9200"], "index": "posts",
                    "auth": {"basic": {"secretRef": {"name": "os-basic"}}}}},
                "workers": {"env": [{"name": "EXTRA", "value": "1"}]}
            })),
            &defaults(),
        )
        .unwrap();
        assert_eq!(
            children.deployment.spec.template,
            without.deployment.spec.template
        );
        assert_eq!(children.config_map.data, without.config_map.data);

        let (deployment, service) = children.query.as_ref().unwrap();
        assert_eq!(deployment.metadata.name.as_deref(), Some("posts-query"));
        assert_eq!(deployment.spec.replicas, Some(2));
        let selector = deployment.spec.selector.match_labels.as_ref().unwrap();
        assert_eq!(selector["app.kubernetes.io/name"], QUERY_NAME);
        let pod = deployment.spec.template.spec.as_ref().unwrap();
        let labels = deployment
            .spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
        assert_ne!(
            labels["app.kubernetes.io/name"], WORKER_NAME,
            "worker selectors must not match it"
        );
        let c = &pod.containers[0];
        assert_eq!(c.args.as_deref(), Some(&["serve".to_owned()][..]));
        assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 8081);
        assert_eq!(c.security_context, container(&children).security_context);
        assert_eq!(
            env(c, "VECTORPIPE_QUERY_ADDRESS").and_then(|e| e.value.as_deref()),
            Some("0.0.0.0:8081")
        );
        assert_eq!(
            env(c, "VECTORPIPE_LLM_MODEL_ID").and_then(|e| e.value.as_deref()),
            Some("anthropic.claude-3-5-haiku-20241022-v1:0")
        );
        let token = env(c, "VECTORPIPE_QUERY_TOKEN").unwrap();
        let from = token
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (from.name.as_str(), from.key.as_str()),
            ("query-token", "token")
        );
        assert!(
            env(c, "VECTORPIPE_OPENSEARCH_PASSWORD").is_some(),
            "the sink's credentials"
        );
        assert!(
            env(c, "VECTORPIPE_METRICS_ADDRESS").is_none(),
            "a worker-only variable"
        );
        let names: Vec<&str> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(
            names.last(),
            Some(&"EXTRA"),
            "the user's variables come last: {names:?}"
        );
        assert!(c.readiness_probe.as_ref().unwrap().exec.is_some());
        let port = &service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
        assert_eq!((port.port, port.name.as_deref()), (8081, Some("http")));
        assert!(
            referenced_secrets(&p)
                .iter()
                .any(|(name, keys)| name == "query-token" && keys == &["token"]),
            "the token Secret is checked like the others"
        );
    }

    #[test]
    fn the_worker_file_holds_only_what_the_worker_reads() {
        let p = pipeline(json!({"workers": {
            "replicas": 2, "logLevel": "debug", "metricsPort": 9191,
            "env": [{"name": "API_TOKEN", "value": "literal-secret-value"}],
            "podAnnotations": {"iam.amazonaws.com/role": "writer"}
        }}));
        let children = build(&p, &defaults()).unwrap();
        let config = &children.config_map.data.as_ref().unwrap()[PIPELINE_FILE];
        assert!(!config.contains("literal-secret-value"), "{config}");
        assert!(!config.contains("iam.amazonaws.com"), "{config}");
        let value: serde_json::Value = serde_yaml::from_str(config).unwrap();
        assert!(
            value["spec"]["workers"].get("replicas").is_none(),
            "{config}"
        );
        assert!(value["spec"].get("suspend").is_none(), "{config}");
        let spec: vectorpipe_crds::v1alpha1::EmbeddingPipelineSpec =
            serde_json::from_value(value["spec"].clone()).unwrap();
        assert_eq!(spec.workers.log_level, "debug");
        assert_eq!(spec.workers.metrics_port, 9191);
        // The literal still reaches the container, where the user put it.
        assert!(env(container(&children), "API_TOKEN").is_some());
    }

    #[test]
    fn worker_pods_mount_no_service_account_token() {
        let children = build(&pipeline(json!({})), &defaults()).unwrap();
        let pod = children.deployment.spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
    }

    #[test]
    fn secrets_reach_the_pod_by_reference_never_in_the_config() {
        let p = pipeline(json!({
            "source": {"kafka": {"bootstrapServers": ["k:9093"], "topics": ["in"], "auth": {"scram": {"secretRef": {"name": "kafka-scram"}, "caSecretRef": {"name": "kafka-ca"}}}}},
            "sink": {"opensearch": {"endpoints": ["https://os:9200"], "index": "docs", "auth": {"basic": {"secretRef": {"name": "os-writer"}}}}}
        }));
        let children = build(&p, &defaults()).unwrap();
        let c = container(&children);
        let from = |name: &str| {
            env(c, name)
                .and_then(|e| e.value_from.as_ref())
                .and_then(|v| v.secret_key_ref.as_ref())
                .map(|s| (s.name.clone(), s.key.clone()))
        };
        assert_eq!(
            from("VECTORPIPE_KAFKA_PASSWORD"),
            Some(("kafka-scram".into(), "password".into()))
        );
        assert_eq!(
            from("VECTORPIPE_OPENSEARCH_USERNAME"),
            Some(("os-writer".into(), "username".into()))
        );
        assert_eq!(
            env(c, "VECTORPIPE_KAFKA_CA_FILE").and_then(|e| e.value.as_deref()),
            Some("/etc/vectorpipe/kafka-ca/ca.crt")
        );
        let config = &children.config_map.data.as_ref().unwrap()[PIPELINE_FILE];
        assert!(
            config.contains("kafka-scram") && !config.contains("password:"),
            "{config}"
        );
        let secrets: Vec<String> = referenced_secrets(&p).into_iter().map(|(n, _)| n).collect();
        assert_eq!(secrets, ["kafka-scram", "kafka-ca", "os-writer"]);
    }

    #[test]
    fn the_rendered_config_is_a_manifest_the_worker_reads() {
        let config = render_config(&pipeline(json!({}))).unwrap();
        let value: serde_json::Value = serde_yaml::from_str(&config).unwrap();
        assert_eq!(value["kind"], "EmbeddingPipeline");
        assert_eq!(value["metadata"]["name"], "posts");
        let spec: vectorpipe_crds::v1alpha1::EmbeddingPipelineSpec =
            serde_json::from_value(value["spec"].clone()).unwrap();
        assert_eq!(spec.sink.opensearch.index, "docs");
    }
}
