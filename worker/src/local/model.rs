//! The local embedding model of the laptop mode: a sentence-transformers BERT model
//! (all-MiniLM-L6-v2) run on the CPU with candle, mean-pooled and L2-normalised.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use text_splitter::{ChunkConfig, TextSplitter};
use tokenizers::{Tokenizer, TruncationParams};

use crate::embed::{EmbedError, Embedded, Embedder};

/// Word pieces the model reads per text; longer texts are truncated (chunk them in the spec).
pub const MAX_TOKENS: usize = 256;
/// Texts the pipeline hands over at once: ordered by length inside, they make forward passes
/// with little padding.
const BATCH_SIZE: usize = 64;
/// Texts per forward pass.
const FORWARD_BATCH: usize = 16;

/// Why the model cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file of the model is missing or unreadable.
    #[error(
        "cannot read {path}: {source}; install the model with examples/laptop/install-model.sh \
         or point --model (VECTORPIPE_MODEL_DIR) at a directory with config.json, \
         tokenizer.json and model.safetensors"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The files are there but do not make a BERT model.
    #[error("{path} is not a usable BERT sentence model: {message}")]
    Invalid {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

struct Inner {
    model: BertModel,
    tokenizer: Tokenizer,
    /// The same tokenizer without truncation, to measure texts.
    sizer: Tokenizer,
    dimensions: usize,
}

/// A BERT sentence model loaded from a directory.
#[derive(Clone)]
pub struct LocalModel {
    inner: Arc<Inner>,
    name: String,
}

fn read(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|source| ModelError::Read {
        path: path.to_owned(),
        source,
    })
}

impl LocalModel {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let invalid = |path: &Path, message: String| ModelError::Invalid {
            path: path.to_owned(),
            message,
        };
        let config_path = dir.join("config.json");
        let config: Config = serde_json::from_slice(&read(&config_path)?)
            .map_err(|e| invalid(&config_path, e.to_string()))?;
        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_bytes(read(&tokenizer_path)?)
            .map_err(|e| invalid(&tokenizer_path, e.to_string()))?;
        // The packaged tokenizer pads and truncates every text to 128 pieces: batches are padded
        // here to their longest text instead, and texts are cut at the model's 256.
        tokenizer.with_padding(None);
        let mut sizer = tokenizer.clone();
        sizer
            .with_truncation(None)
            .map_err(|e| invalid(&tokenizer_path, e.to_string()))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| invalid(&tokenizer_path, e.to_string()))?;
        let weights_path = dir.join("model.safetensors");
        let weights = read(&weights_path)?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)
            .map_err(|e| invalid(&weights_path, e.to_string()))?;
        let model =
            BertModel::load(vb, &config).map_err(|e| invalid(&weights_path, e.to_string()))?;
        let name = dir
            .ancestors()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .find(|n| n != "model")
            .unwrap_or_else(|| "local".to_owned());
        Ok(Self {
            inner: Arc::new(Inner {
                model,
                tokenizer,
                sizer,
                dimensions: config.hidden_size,
            }),
            name,
        })
    }

    /// The vector length.
    pub fn dimensions(&self) -> usize {
        self.inner.dimensions
    }

    /// A name for the model (its directory), recorded in the store.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Splits a text the model would truncate into pieces it reads whole (by its own word
    /// pieces, on semantic boundaries); shorter texts come back as they are.
    pub fn fit(&self, text: &str) -> Vec<String> {
        // [CLS] and [SEP] take two of the model's positions.
        let capacity = MAX_TOKENS - 2;
        let fits = self
            .inner
            .sizer
            .encode_fast(text, false)
            .map(|e| e.get_ids().len() <= capacity)
            .unwrap_or(true);
        if fits {
            return vec![text.to_owned()];
        }
        TextSplitter::new(ChunkConfig::new(capacity).with_sizer(&self.inner.sizer))
            .chunks(text)
            .map(str::to_owned)
            .collect()
    }

    /// Embeds texts synchronously (CPU-bound: call it off the async runtime).
    ///
    /// The texts are ordered by length and run in forward passes of [`FORWARD_BATCH`] texts of
    /// similar length, so little of each pass is padding; the vectors come back in the order of
    /// `texts`.
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Vec<Embedded>, String> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .inner
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| format!("tokenizing: {e}"))?;
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| encodings[i].get_ids().len());
        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); encodings.len()];
        for group in order.chunks(FORWARD_BATCH) {
            let pieces: Vec<&[u32]> = group.iter().map(|&i| encodings[i].get_ids()).collect();
            let embedded = self
                .forward(&pieces)
                .map_err(|e| format!("running the model: {e}"))?;
            for (&i, vector) in group.iter().zip(embedded) {
                vectors[i] = vector;
            }
        }
        Ok(vectors
            .into_iter()
            .zip(&encodings)
            .map(|(vector, encoding)| Embedded {
                vector,
                tokens: encoding.get_ids().len() as u64,
            })
            .collect())
    }

    /// One forward pass over word-piece ids, padded to the longest: mean-pooled, unit vectors.
    fn forward(&self, pieces: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let width = pieces.iter().map(|p| p.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(pieces.len() * width);
        let mut mask = Vec::with_capacity(pieces.len() * width);
        for piece in pieces {
            ids.extend_from_slice(piece);
            ids.extend(std::iter::repeat_n(0u32, width - piece.len()));
            mask.extend(std::iter::repeat_n(1u32, piece.len()));
            mask.extend(std::iter::repeat_n(0u32, width - piece.len()));
        }
        let device = &Device::Cpu;
        let input_ids = Tensor::from_vec(ids, (pieces.len(), width), device)?;
        let token_types = input_ids.zeros_like()?;
        let attention = Tensor::from_vec(mask, (pieces.len(), width), device)?;
        let hidden = self
            .inner
            .model
            .forward(&input_ids, &token_types, Some(&attention))?;
        // Mean over the real tokens, then unit length: cosine similarity becomes a dot product.
        let weights = attention.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&weights)?.sum(1)?;
        let mean = summed.broadcast_div(&weights.sum(1)?)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
        mean.broadcast_div(&norm)?.to_vec2::<f32>()
    }
}

impl Embedder for LocalModel {
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Embedded>, EmbedError> {
        let model = self.clone();
        tokio::task::spawn_blocking(move || model.embed_blocking(&texts))
            .await
            .map_err(|e| EmbedError::Misconfigured(format!("the model task failed: {e}")))?
            .map_err(EmbedError::Misconfigured)
    }

    fn batch_size(&self) -> usize {
        BATCH_SIZE
    }

    fn split_to_fit(&self, text: &str) -> Option<Vec<String>> {
        let parts = self.fit(text);
        (parts.len() > 1).then_some(parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Texts of different lengths embedded together come back in their own order, each with
    /// the vector it gets alone (the batch is reordered by length inside).
    #[test]
    fn a_batch_ordered_by_length_keeps_the_texts_order() {
        let Some(dir) = std::env::var_os("VECTORPIPE_MODEL_DIR") else {
            eprintln!("VECTORPIPE_MODEL_DIR is not set (tests/run-all.sh sets it): not run");
            return;
        };
        let model = LocalModel::load(Path::new(&dir)).expect("the model loads");
        let texts: Vec<String> = (0..40)
            .map(|i| {
                let words = [7, 1, 30, 3, 18][i % 5] + i;
                format!("text {i}: {}", "sourdough starter ".repeat(words))
            })
            .collect();
        let together = model.embed_blocking(&texts).expect("embeds");
        assert_eq!(together.len(), texts.len());
        for (i, text) in texts.iter().enumerate() {
            let alone = model
                .embed_blocking(std::slice::from_ref(text))
                .expect("embeds");
            let gap = alone[0]
                .vector
                .iter()
                .zip(&together[i].vector)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(gap < 1e-4, "text {i} got another text's vector (gap {gap})");
            assert_eq!(alone[0].tokens, together[i].tokens, "text {i}");
        }
    }
}
