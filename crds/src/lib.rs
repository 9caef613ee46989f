//! The vectorpipe API: the `EmbeddingPipeline` and `ScalingPolicy` resources of
//! `vectorpipe.io/v1alpha1`, their defaults and the checks that need no server.
//!
//! Without the `kube` feature the crate holds plain serde/schemars types, which is what the worker
//! uses to read a pipeline spec from a file. With it, the types also derive `kube::CustomResource`
//! and [`crd_yaml`] renders the CustomResourceDefinitions.

pub mod index;
pub mod redrive;
pub mod topics;
pub mod v1alpha1;
pub mod validate;

/// The API group.
pub const GROUP: &str = "vectorpipe.io";
/// The API version inside the group.
pub const VERSION: &str = "v1alpha1";

/// Every CustomResourceDefinition of the API as `(file name, YAML)`, in a stable order.
#[cfg(feature = "kube")]
pub fn crd_yaml() -> Vec<(&'static str, String)> {
    use kube::CustomResourceExt;
    let render = |crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        let mut text = String::from(
            "# Generated from the Rust types in crds/src by `cargo run -p vectorpipe-crds --features kube --bin crdgen`.\n# Do not edit by hand.\n",
        );
        text.push_str(&serde_yaml::to_string(&crd).expect("a CRD always serialises"));
        text
    };
    vec![
        (
            "vectorpipe.io_embeddingpipelines.yaml",
            render(v1alpha1::EmbeddingPipeline::crd()),
        ),
        (
            "vectorpipe.io_scalingpolicies.yaml",
            render(v1alpha1::ScalingPolicy::crd()),
        ),
    ]
}
