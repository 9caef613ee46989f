//! What vectorpipe knows about Bedrock embedding models: vector sizes and input limits.

use super::embedding_pipeline::BedrockEmbedding;

/// The request/response shape a model id speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFamily {
    /// `amazon.titan-embed-text-v1`: one text per call, 1536 dimensions.
    TitanTextV1,
    /// `amazon.titan-embed-text-v2:0`: one text per call, 256/512/1024 dimensions.
    TitanTextV2,
    /// `cohere.embed-english-v3`, `cohere.embed-multilingual-v3`: up to 96 texts per call, 1024
    /// dimensions.
    CohereEmbedV3,
    /// Any other id (a custom or newer model): `dimensions` must be given.
    Unknown,
}

/// The most texts a Cohere embed call takes.
pub const COHERE_MAX_BATCH: usize = 96;

impl ModelFamily {
    /// Recognises a model id, a cross-region inference profile id (`eu.amazon.titan-…`) or a
    /// foundation-model ARN.
    pub fn of(model_id: &str) -> Self {
        let base = model_id.rsplit('/').next().unwrap_or(model_id);
        let base = ["us.", "eu.", "apac.", "us-gov.", "global."]
            .iter()
            .find_map(|p| base.strip_prefix(p))
            .unwrap_or(base);
        if base.starts_with("amazon.titan-embed-text-v2") {
            Self::TitanTextV2
        } else if base.starts_with("amazon.titan-embed-text-v1") {
            Self::TitanTextV1
        } else if base.starts_with("cohere.embed-english-v3")
            || base.starts_with("cohere.embed-multilingual-v3")
        {
            Self::CohereEmbedV3
        } else {
            Self::Unknown
        }
    }

    /// The vector sizes the family can produce, the default first.
    pub fn dimension_choices(self) -> &'static [i32] {
        match self {
            Self::TitanTextV1 => &[1536],
            Self::TitanTextV2 => &[1024, 512, 256],
            Self::CohereEmbedV3 => &[1024],
            Self::Unknown => &[],
        }
    }

    /// The longest text, in characters, one input may have.
    pub fn max_input_chars(self) -> Option<usize> {
        match self {
            Self::TitanTextV1 | Self::TitanTextV2 => Some(50_000),
            Self::CohereEmbedV3 => Some(2048),
            Self::Unknown => None,
        }
    }

    /// The most texts one call may carry.
    pub fn max_batch(self) -> usize {
        match self {
            Self::CohereEmbedV3 => COHERE_MAX_BATCH,
            _ => 1,
        }
    }
}

/// Why a model configuration is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// The model is unknown and no size was given.
    #[error(
        "embedding.bedrock.modelId {0:?} is not a model vectorpipe knows; set embedding.bedrock.dimensions to the size of its vectors"
    )]
    UnknownDimensions(String),
    /// The size is not one the model produces.
    #[error(
        "embedding.bedrock.modelId {model:?} produces {choices:?} dimensions, not {requested}; set embedding.bedrock.dimensions to one of them"
    )]
    UnsupportedDimensions {
        /// The model id.
        model: String,
        /// The size asked for.
        requested: i32,
        /// The sizes it can produce.
        choices: Vec<i32>,
    },
}

impl BedrockEmbedding {
    /// The model's family.
    pub fn family(&self) -> ModelFamily {
        ModelFamily::of(&self.model_id)
    }

    /// The size of the vectors this configuration produces.
    pub fn vector_dimensions(&self) -> Result<i32, ModelError> {
        let choices = self.family().dimension_choices();
        match (self.dimensions, choices.first()) {
            (None, Some(default)) => Ok(*default),
            (None, None) => Err(ModelError::UnknownDimensions(self.model_id.clone())),
            (Some(d), _) if choices.is_empty() || choices.contains(&d) => Ok(d),
            (Some(d), _) => Err(ModelError::UnsupportedDimensions {
                model: self.model_id.clone(),
                requested: d,
                choices: choices.to_vec(),
            }),
        }
    }

    /// Texts per call: the spec's `batchSize` within what the model takes.
    pub fn effective_batch_size(&self) -> usize {
        let wanted = self.batch_size.map_or(usize::MAX, |b| b.max(1) as usize);
        let max = self.family().max_batch();
        if self.batch_size.is_none() {
            max
        } else {
            wanted.min(max)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(id: &str, dimensions: Option<i32>) -> BedrockEmbedding {
        serde_json::from_value(serde_json::json!({ "modelId": id, "dimensions": dimensions }))
            .unwrap()
    }

    #[test]
    fn families_are_recognised_from_ids_profiles_and_arns() {
        let cases = [
            ("amazon.titan-embed-text-v2:0", ModelFamily::TitanTextV2),
            ("amazon.titan-embed-text-v1", ModelFamily::TitanTextV1),
            ("cohere.embed-english-v3", ModelFamily::CohereEmbedV3),
            ("cohere.embed-multilingual-v3", ModelFamily::CohereEmbedV3),
            ("eu.amazon.titan-embed-text-v2:0", ModelFamily::TitanTextV2),
            (
                "arn:aws:bedrock:eu-west-1::foundation-model/amazon.titan-embed-text-v2:0",
                ModelFamily::TitanTextV2,
            ),
            ("acme.custom-embedder", ModelFamily::Unknown),
        ];
        for (id, want) in cases {
            assert_eq!(ModelFamily::of(id), want, "{id}");
        }
    }

    #[test]
    fn dimensions_default_per_family_and_are_checked() {
        assert_eq!(
            model("amazon.titan-embed-text-v2:0", None).vector_dimensions(),
            Ok(1024)
        );
        assert_eq!(
            model("amazon.titan-embed-text-v2:0", Some(512)).vector_dimensions(),
            Ok(512)
        );
        assert_eq!(
            model("amazon.titan-embed-text-v1", None).vector_dimensions(),
            Ok(1536)
        );
        assert_eq!(
            model("cohere.embed-english-v3", None).vector_dimensions(),
            Ok(1024)
        );
        assert_eq!(model("acme.custom", Some(384)).vector_dimensions(), Ok(384));
        let err = model("amazon.titan-embed-text-v2:0", Some(768))
            .vector_dimensions()
            .unwrap_err();
        assert!(
            err.to_string().contains("set embedding.bedrock.dimensions"),
            "{err}"
        );
        assert!(matches!(
            model("acme.custom", None).vector_dimensions(),
            Err(ModelError::UnknownDimensions(_))
        ));
    }

    #[test]
    fn batch_size_is_bounded_by_the_model() {
        let mut cohere = model("cohere.embed-english-v3", None);
        assert_eq!(cohere.effective_batch_size(), 96);
        cohere.batch_size = Some(32);
        assert_eq!(cohere.effective_batch_size(), 32);
        let mut titan = model("amazon.titan-embed-text-v2:0", None);
        titan.batch_size = Some(10);
        assert_eq!(titan.effective_batch_size(), 1);
    }
}
