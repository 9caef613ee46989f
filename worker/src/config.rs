//! Reading a pipeline spec from a YAML file.
//!
//! The operator mounts the spec of an EmbeddingPipeline as a file; on a laptop a user writes one
//! by hand. Both a whole `EmbeddingPipeline` manifest and a bare spec are accepted.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use vectorpipe_crds::v1alpha1::EmbeddingPipelineSpec;
use vectorpipe_crds::validate;

/// Why a pipeline file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read pipeline file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a pipeline.
    #[error("{path} is not an EmbeddingPipeline or its spec: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The YAML error, with line and column.
        source: serde_yaml::Error,
    },
    /// The file is a pipeline with problems.
    #[error("{path} has an invalid pipeline spec: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        source: validate::Problems,
    },
}

/// The pipeline's name and namespace, from a manifest's metadata (empty for a bare spec).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// `metadata.name`.
    pub name: Option<String>,
    /// `metadata.namespace`.
    pub namespace: Option<String>,
}

/// Reads `metadata.name` / `metadata.namespace` from a manifest, if the file is one.
pub fn identity(path: &Path) -> Identity {
    let value: serde_yaml::Value = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_yaml::from_str(&t).ok())
        .unwrap_or_default();
    let field = |k: &str| value["metadata"][k].as_str().map(str::to_owned);
    Identity {
        name: field("name"),
        namespace: field("namespace"),
    }
}

/// A manifest (`apiVersion`/`kind`/`spec`) or a bare spec.
#[derive(Deserialize)]
#[serde(untagged)]
enum PipelineFile {
    Manifest { spec: Box<EmbeddingPipelineSpec> },
    Spec(Box<EmbeddingPipelineSpec>),
}

/// Parses and checks a pipeline spec.
pub fn parse(text: &str, path: &Path) -> Result<EmbeddingPipelineSpec, ConfigError> {
    // Try the manifest form first so that a manifest with an error in its spec reports that
    // error, rather than the untagged enum's generic "did not match any variant".
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
    let spec = if value.get("spec").is_some() {
        match serde_yaml::from_value::<PipelineFile>(value.clone()) {
            Ok(PipelineFile::Manifest { spec }) | Ok(PipelineFile::Spec(spec)) => *spec,
            Err(_) => serde_yaml::from_value::<EmbeddingPipelineSpec>(value["spec"].clone())
                .map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    source,
                })?,
        }
    } else {
        serde_yaml::from_value(value).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?
    };
    validate::pipeline(&spec).map_err(|source| ConfigError::Invalid {
        path: path.to_owned(),
        source,
    })?;
    Ok(spec)
}

/// Reads, parses and checks a pipeline file.
pub fn load(path: &Path) -> Result<EmbeddingPipelineSpec, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
source: {kafka: {bootstrapServers: ["k:9092"], topics: ["in"]}}
embedding: {bedrock: {modelId: amazon.titan-embed-text-v2:0}}
sink: {opensearch: {endpoints: ["http://os:9200"], index: docs}}
"#;

    #[test]
    fn reads_a_bare_spec_and_a_manifest() {
        let bare = parse(SPEC, Path::new("bare.yaml")).unwrap();
        let manifest = format!(
            "apiVersion: vectorpipe.io/v1alpha1\nkind: EmbeddingPipeline\nmetadata: {{name: x}}\nspec:\n{}",
            SPEC.lines().map(|l| format!("  {l}\n")).collect::<String>()
        );
        let wrapped = parse(&manifest, Path::new("manifest.yaml")).unwrap();
        assert_eq!(bare, wrapped);
        assert_eq!(bare.sink.opensearch.index, "docs");
    }

    #[test]
    fn a_broken_spec_names_the_file_and_the_field() {
        let manifest = "kind: EmbeddingPipeline\nspec:\n  source: {kafka: {topics: [a]}}\n";
        let err = parse(manifest, Path::new("p.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.yaml") && err.contains("bootstrapServers"),
            "{err}"
        );
    }

    #[test]
    fn an_invalid_spec_lists_what_to_fix() {
        let text = SPEC.replace("amazon.titan-embed-text-v2:0", "acme.unknown");
        let err = parse(&text, Path::new("p.yaml")).unwrap_err().to_string();
        assert!(err.contains("set embedding.bedrock.dimensions"), "{err}");
    }

    #[test]
    fn a_missing_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(&dir.path().join("nope.yaml")).unwrap_err().to_string();
        assert!(err.contains("nope.yaml"), "{err}");
    }
}
