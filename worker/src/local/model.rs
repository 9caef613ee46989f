//! The local embedding model of the laptop mode: a sentence-transformers BERT model
//! (all-MiniLM-L6-v2) exported to ONNX and run on the CPU by ONNX Runtime, mean-pooled and
//! L2-normalised here.
//!
//! ONNX Runtime is a shared library loaded when the model is: `libonnxruntime.so` in the model
//! directory (examples/laptop/install-model.sh puts the one of the PyPI wheel there), or the file
//! `VECTORPIPE_ONNXRUNTIME` names.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ort::environment::Environment;
use ort::session::Session;
use ort::value::Tensor;
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
         tokenizer.json, model.onnx and libonnxruntime.so"
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
    /// ONNX Runtime cannot be loaded from the library file.
    #[error(
        "cannot load ONNX Runtime from {path}: {message}; run examples/laptop/install-model.sh \
         (it puts libonnxruntime.so from the PyPI wheel onnxruntime==1.32.0 into the model \
         directory) or set VECTORPIPE_ONNXRUNTIME to a libonnxruntime.so of version 1.22 or later"
    )]
    Runtime {
        /// The library file.
        path: PathBuf,
        /// What ONNX Runtime said.
        message: String,
    },
}

/// The part of the model's `config.json` the pooling needs.
#[derive(serde::Deserialize)]
struct Config {
    hidden_size: usize,
}

struct Inner {
    /// `Session::run` needs `&mut`; one pass at a time uses every core anyway.
    session: Mutex<Session>,
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
    /// Loads `config.json`, `tokenizer.json` and `model.onnx` from `dir`, with ONNX Runtime from
    /// `VECTORPIPE_ONNXRUNTIME` or `dir/libonnxruntime.so`.
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
        let session = open_session(dir)?;
        let name = dir
            .ancestors()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .find(|n| n != "model")
            .unwrap_or_else(|| "local".to_owned());
        Ok(Self {
            inner: Arc::new(Inner {
                session: Mutex::new(session),
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
    fn forward(&self, pieces: &[&[u32]]) -> Result<Vec<Vec<f32>>, String> {
        let width = pieces.iter().map(|p| p.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(pieces.len() * width);
        let mut mask = Vec::with_capacity(pieces.len() * width);
        for piece in pieces {
            ids.extend(piece.iter().map(|&id| i64::from(id)));
            ids.extend(std::iter::repeat_n(0i64, width - piece.len()));
            mask.extend(std::iter::repeat_n(1i64, piece.len()));
            mask.extend(std::iter::repeat_n(0i64, width - piece.len()));
        }
        let types = vec![0i64; ids.len()];
        let shape = [pieces.len(), width];
        let tensor =
            |values: Vec<i64>| Tensor::from_array((shape, values)).map_err(|e| e.to_string());
        let (ids, mask, types) = (tensor(ids)?, tensor(mask)?, tensor(types)?);
        let mut session = self.inner.session.lock().unwrap_or_else(|e| e.into_inner());
        let outputs = session
            .run(ort::inputs! {
                "input_ids" => ids,
                "attention_mask" => mask,
                "token_type_ids" => types,
            })
            .map_err(|e| e.to_string())?;
        let (shape, hidden) = outputs["last_hidden_state"]
            .try_extract_tensor::<f32>()
            .map_err(|e| e.to_string())?;
        let dims = self.inner.dimensions;
        let expected = [pieces.len(), width, dims].map(|n| n as i64);
        if shape[..] != expected[..] {
            return Err(format!(
                "the model's last_hidden_state has the shape {shape:?}, not {expected:?}: \
                 model.onnx does not match config.json"
            ));
        }
        // Mean over the real tokens, then unit length: cosine similarity becomes a dot product.
        Ok(pieces
            .iter()
            .enumerate()
            .map(|(row, piece)| {
                let mut mean = vec![0f32; dims];
                for position in 0..piece.len() {
                    let start = (row * width + position) * dims;
                    for (m, v) in mean.iter_mut().zip(&hidden[start..start + dims]) {
                        *m += v;
                    }
                }
                // The sum and the mean point the same way: one division makes either a unit vector.
                let norm = mean.iter().map(|m| m * m).sum::<f32>().sqrt();
                let scale = 1.0 / norm.max(f32::MIN_POSITIVE);
                mean.iter_mut().for_each(|m| *m *= scale);
                mean
            })
            .collect())
    }
}

/// ONNX Runtime allows one environment per process, loaded from one library: the first model
/// loaded sets both, later ones share them.
static ENVIRONMENT: Mutex<Option<Environment>> = Mutex::new(None);

/// Loads ONNX Runtime (once per process) and the model's graph.
fn open_session(dir: &Path) -> Result<Session, ModelError> {
    let library = std::env::var_os("VECTORPIPE_ONNXRUNTIME")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("libonnxruntime.so"));
    let runtime = |message: String| ModelError::Runtime {
        path: library.clone(),
        message,
    };
    let mut shared = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
    let environment = match &mut *shared {
        Some(environment) => environment,
        slot @ None => {
            if !library.exists() {
                return Err(runtime("no such file".to_owned()));
            }
            let environment = ort::init_from(&library)
                .map_err(|e| runtime(e.to_string()))?
                .with_name("vectorpipe")
                .with_telemetry(false)
                .build()
                .map_err(|e| runtime(e.to_string()))?;
            slot.insert(environment)
        }
    };
    let graph_path = dir.join("model.onnx");
    std::fs::metadata(&graph_path).map_err(|source| ModelError::Read {
        path: graph_path.clone(),
        source,
    })?;
    let invalid = |message: String| ModelError::Invalid {
        path: graph_path.clone(),
        message,
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    Session::builder(environment)
        .map_err(|e| invalid(e.to_string()))?
        .with_intra_threads(threads)
        .map_err(|e| invalid(e.to_string()))?
        .commit_from_file(&graph_path)
        .map_err(|e| invalid(e.to_string()))
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

    /// The model of `VECTORPIPE_MODEL_DIR` (tests/run-all.sh sets it), or None when it is unset.
    fn installed_model() -> Option<LocalModel> {
        let Some(dir) = std::env::var_os("VECTORPIPE_MODEL_DIR") else {
            eprintln!("VECTORPIPE_MODEL_DIR is not set (tests/run-all.sh sets it): not run");
            return None;
        };
        Some(LocalModel::load(Path::new(&dir)).expect("the model loads"))
    }

    /// The vectors are sentence-transformers' own for these weights: the references are the
    /// first components that `SentenceTransformer(dir).encode(texts, normalize_embeddings=True)`
    /// gave for the same texts in one batch (sentence-transformers 6.3, torch 2.15), so the
    /// pooling, the padding mask and the normalisation are all checked.
    #[test]
    fn the_vectors_are_the_ones_sentence_transformers_gives() {
        let Some(model) = installed_model() else {
            return;
        };
        let references: [(&str, [f32; 8]); 2] = [
            (
                "My sourdough starter smells like acetone after two days in the fridge.",
                [
                    -0.04155, -0.042239, 0.005204, 0.012267, 0.099834, -0.011622, -0.063152,
                    0.061533,
                ],
            ),
            (
                "lag",
                [
                    0.023828, -0.084142, -0.01585, 0.048236, -0.012777, 0.001113, -0.010745,
                    -0.049868,
                ],
            ),
        ];
        let texts: Vec<String> = references.iter().map(|(t, _)| (*t).to_owned()).collect();
        let embedded = model.embed_blocking(&texts).expect("embeds");
        for ((text, reference), got) in references.iter().zip(&embedded) {
            assert_eq!(got.vector.len(), 384, "{text}");
            let norm = got.vector.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "{text}: norm {norm}");
            for (i, (want, have)) in reference.iter().zip(&got.vector).enumerate() {
                assert!(
                    (want - have).abs() < 1e-5,
                    "{text}: component {i} is {have}, sentence-transformers gives {want}"
                );
            }
        }
    }

    /// Texts of different lengths embedded together come back in their own order, each with
    /// the vector it gets alone (the batch is reordered by length inside).
    #[test]
    fn a_batch_ordered_by_length_keeps_the_texts_order() {
        let Some(model) = installed_model() else {
            return;
        };
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
