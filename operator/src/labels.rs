//! Names the operator writes: field manager, labels, annotations, finalizers.

/// The server-side apply field manager of every object the operator writes.
pub const FIELD_MANAGER: &str = "vectorpipe-operator";
/// The field manager of the scaling controller's writes of `spec.workers.replicas`, so other
/// writers of the count can be told apart in managedFields.
pub const SCALING_FIELD_MANAGER: &str = "vectorpipe-operator-scaling";
/// The `app.kubernetes.io/name` of worker pods.
pub const WORKER_NAME: &str = "vectorpipe-worker";
/// The `app.kubernetes.io/name` of query server pods.
pub const QUERY_NAME: &str = "vectorpipe-query";
/// The pipeline a worker object belongs to.
pub const PIPELINE_LABEL: &str = "vectorpipe.io/pipeline";
/// The hash of the rendered worker config; a change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "vectorpipe.io/config-hash";
/// Where the pipeline file is mounted in worker pods.
pub const PIPELINE_MOUNT: &str = "/etc/vectorpipe";
/// The pipeline file's name in the ConfigMap.
pub const PIPELINE_FILE: &str = "pipeline.yaml";
/// Seconds the worker may take to drain after SIGTERM.
pub const WORKER_DRAIN_SECONDS: i64 = 25;
