//! The OpenSearch index a pipeline writes to: whether an existing index's mapping fits the
//! pipeline. Shared by the worker (which refuses to start on a mismatch) and the operator (which
//! reports it in the pipeline's status).

use serde_json::Value;

use crate::v1alpha1::{OpenSearchSink, SpaceType};

/// The name OpenSearch uses for a space type.
pub fn space_type_name(s: SpaceType) -> &'static str {
    match s {
        SpaceType::L2 => "l2",
        SpaceType::Cosinesimil => "cosinesimil",
        SpaceType::Innerproduct => "innerproduct",
    }
}

/// How an existing index differs from what the pipeline writes; the message says what to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MappingMismatch {
    /// The vector field has another dimension than the model produces.
    #[error(
        "sink.opensearch.index {index:?} has dimension {existing} but the model is configured for {wanted}; set embedding.bedrock.dimensions: {existing} (if the model supports it) or use a new index"
    )]
    Dimension {
        /// The index.
        index: String,
        /// Its field's dimension.
        existing: i64,
        /// The model's.
        wanted: i32,
    },
    /// The vector field uses another space type.
    #[error(
        "sink.opensearch.index {index:?} uses space type {existing} but the pipeline asks for {wanted}; set sink.opensearch.method.spaceType: {existing} or use a new index"
    )]
    SpaceType {
        /// The index.
        index: String,
        /// Its field's space type.
        existing: String,
        /// The pipeline's.
        wanted: &'static str,
    },
    /// The index has no such field.
    #[error(
        "index {index:?} exists but has no field {field:?}; set sink.opensearch.vectorField to its knn_vector field or use a new index"
    )]
    MissingField {
        /// The index.
        index: String,
        /// The vector field the pipeline writes.
        field: String,
    },
    /// The field is not a k-NN vector.
    #[error("field {field:?} of index {index:?} is {found}, not knn_vector; use a new index")]
    NotKnnVector {
        /// The index.
        index: String,
        /// The field.
        field: String,
        /// Its type.
        found: String,
    },
}

impl MappingMismatch {
    /// The status reason for it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Dimension { .. } => "IndexDimensionMismatch",
            Self::SpaceType { .. } => "IndexSpaceTypeMismatch",
            Self::MissingField { .. } | Self::NotKnnVector { .. } => "IndexMappingMismatch",
        }
    }
}

/// Checks the answer of `GET <index>/_mapping` against the pipeline's sink and the model's
/// vector dimension.
pub fn check_mapping(
    spec: &OpenSearchSink,
    dimensions: i32,
    mapping: &Value,
) -> Result<(), MappingMismatch> {
    let index = spec.index.clone();
    let field = mapping
        .as_object()
        .and_then(|m| m.values().next())
        .map(|m| &m["mappings"]["properties"][&spec.vector_field])
        .filter(|f| !f.is_null())
        .ok_or_else(|| MappingMismatch::MissingField {
            index: index.clone(),
            field: spec.vector_field.clone(),
        })?;
    if field["type"] != "knn_vector" {
        return Err(MappingMismatch::NotKnnVector {
            index,
            field: spec.vector_field.clone(),
            found: field["type"].to_string(),
        });
    }
    let existing = field["dimension"].as_i64().unwrap_or_default();
    if existing != i64::from(dimensions) {
        return Err(MappingMismatch::Dimension {
            index,
            existing,
            wanted: dimensions,
        });
    }
    let existing_space = field["method"]["space_type"]
        .as_str()
        .or_else(|| field["space_type"].as_str());
    let wanted = space_type_name(spec.method.space_type);
    if let Some(existing_space) = existing_space
        && existing_space != wanted
    {
        return Err(MappingMismatch::SpaceType {
            index,
            existing: existing_space.to_owned(),
            wanted,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sink() -> OpenSearchSink {
        serde_json::from_value(json!({"endpoints": ["http://os:9200"], "index": "docs"})).unwrap()
    }

    fn mapping(dim: i64, space: &str) -> Value {
        json!({"docs": {"mappings": {"properties": {"embedding": {
            "type": "knn_vector", "dimension": dim, "method": {"space_type": space}
        }}}}})
    }

    #[test]
    fn an_existing_index_must_match_dimension_and_space() {
        let spec = sink();
        assert_eq!(check_mapping(&spec, 1024, &mapping(1024, "l2")), Ok(()));
        let err = check_mapping(&spec, 1024, &mapping(768, "l2")).unwrap_err();
        assert_eq!(err.reason(), "IndexDimensionMismatch");
        let text = err.to_string();
        assert!(
            text.contains("has dimension 768")
                && text.contains("embedding.bedrock.dimensions: 768"),
            "{text}"
        );
        let err = check_mapping(&spec, 1024, &mapping(1024, "innerproduct")).unwrap_err();
        assert_eq!(err.reason(), "IndexSpaceTypeMismatch");
        assert!(err.to_string().contains("spaceType: innerproduct"), "{err}");
        let err = check_mapping(
            &spec,
            1024,
            &json!({"docs": {"mappings": {"properties": {}}}}),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "IndexMappingMismatch");
        assert!(err.to_string().contains("no field"), "{err}");
        // Newer OpenSearch versions also put space_type next to the dimension.
        let top = json!({"docs": {"mappings": {"properties": {"embedding": {
            "type": "knn_vector", "dimension": 1024, "space_type": "cosinesimil"
        }}}}});
        assert_eq!(
            check_mapping(&spec, 1024, &top).unwrap_err().reason(),
            "IndexSpaceTypeMismatch"
        );
    }
}
