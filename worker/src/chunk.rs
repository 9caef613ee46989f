//! Splitting long texts into chunks before embedding.

use text_splitter::{ChunkConfig, TextSplitter};
use unicode_segmentation::UnicodeSegmentation;
use vectorpipe_crds::v1alpha1::{Chunking, ChunkingStrategy};

use crate::transform::Document;

/// Splits `text` according to the spec. `model_max_chars` is the longest input the model accepts;
/// with strategy `none`, longer texts are truncated to it (at a character boundary).
pub fn split(text: &str, chunking: &Chunking, model_max_chars: Option<usize>) -> Vec<String> {
    let max = chunking.max_chars.max(1) as usize;
    let overlap = (chunking.overlap_chars.max(0) as usize).min(max - 1);
    if chunking.strategy != ChunkingStrategy::None && text.chars().count() <= max {
        return vec![text.to_owned()];
    }
    match chunking.strategy {
        ChunkingStrategy::None => vec![match model_max_chars {
            Some(limit) => text.chars().take(limit).collect(),
            None => text.to_owned(),
        }],
        ChunkingStrategy::Characters => windows(text, max, overlap),
        ChunkingStrategy::Recursive => recursive(text, max, overlap),
        ChunkingStrategy::Sentences => sentences(text, max, overlap),
    }
}

/// Re-splits the documents of one record whose text is longer than the model reads (`split`
/// gives the pieces, `None` when a text fits), renumbering the record's chunks so that ids stay
/// `<id>#<n>` over all of them. Records that fit are returned as they are.
pub fn fit(docs: Vec<Document>, split: impl Fn(&str) -> Option<Vec<String>>) -> Vec<Document> {
    let splits: Vec<Option<Vec<String>>> = docs
        .iter()
        .map(|doc| split(&doc.text).filter(|parts| parts.len() > 1))
        .collect();
    if splits.iter().all(Option::is_none) {
        return docs;
    }
    let total: usize = splits
        .iter()
        .map(|parts| parts.as_ref().map_or(1, Vec::len))
        .sum();
    let mut out = Vec::with_capacity(total);
    for (doc, parts) in docs.into_iter().zip(splits) {
        let texts = parts.unwrap_or_else(|| vec![doc.text.clone()]);
        for text in texts {
            let n = out.len();
            out.push(Document {
                id: format!("{}#{n}", doc.parent_id),
                chunk: n,
                chunks: total,
                text,
                ..doc.clone()
            });
        }
    }
    out
}

/// Fixed windows of `max` characters, each starting `max - overlap` after the previous one.
fn windows(text: &str, max: usize, overlap: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let step = max - overlap;
    let mut chunks = Vec::new();
    let mut start = 0;
    loop {
        let end = (start + max).min(chars.len());
        chunks.push(chars[start..end].iter().collect());
        if end == chars.len() {
            return chunks;
        }
        start += step;
    }
}

/// The largest semantic unit that fits: paragraphs, then sentences, words, graphemes.
fn recursive(text: &str, max: usize, overlap: usize) -> Vec<String> {
    let config = match ChunkConfig::new(max).with_overlap(overlap) {
        Ok(config) => config,
        // Unreachable with overlap < max; fall back to no overlap rather than fail a record.
        Err(_) => ChunkConfig::new(max),
    };
    TextSplitter::new(config)
        .chunks(text)
        .map(str::to_owned)
        .collect()
}

/// Whole sentences packed up to `max` characters; the last `overlap` characters' worth of
/// sentences are repeated at the start of the next chunk. A sentence longer than `max` is split
/// like the recursive strategy.
fn sentences(text: &str, max: usize, overlap: usize) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut length = 0;
    let len = |s: &str| s.chars().count();
    for sentence in text.split_sentence_bounds() {
        let n = len(sentence);
        if n > max {
            if !current.is_empty() {
                chunks.push(current.concat().trim().to_owned());
                current.clear();
                length = 0;
            }
            chunks.extend(recursive(sentence, max, overlap));
            continue;
        }
        if length + n > max && !current.is_empty() {
            chunks.push(current.concat().trim().to_owned());
            // Carry trailing sentences that fit in the overlap budget.
            let mut carried = Vec::new();
            let mut carried_len = 0;
            for s in current.iter().rev() {
                if carried_len + len(s) > overlap || carried_len + len(s) + n > max {
                    break;
                }
                carried_len += len(s);
                carried.push(*s);
            }
            carried.reverse();
            current = carried;
            length = carried_len;
        }
        current.push(sentence);
        length += n;
    }
    if !current.is_empty() {
        chunks.push(current.concat().trim().to_owned());
    }
    chunks.retain(|c| !c.is_empty());
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(strategy: ChunkingStrategy, max: i32, overlap: i32) -> Chunking {
        Chunking {
            strategy,
            max_chars: max,
            overlap_chars: overlap,
        }
    }

    #[test]
    fn short_texts_are_one_chunk_whatever_the_strategy() {
        for strategy in [
            ChunkingStrategy::Characters,
            ChunkingStrategy::Recursive,
            ChunkingStrategy::Sentences,
        ] {
            assert_eq!(
                split("short text", &config(strategy, 100, 10), None),
                ["short text"]
            );
        }
    }

    #[test]
    fn none_truncates_at_the_model_limit() {
        let text = "é".repeat(10);
        let chunks = split(&text, &config(ChunkingStrategy::None, 100, 0), Some(4));
        assert_eq!(chunks, ["éééé"]);
    }

    #[test]
    fn character_windows_overlap_as_asked() {
        let chunks = split(
            "abcdefghij",
            &config(ChunkingStrategy::Characters, 4, 1),
            None,
        );
        assert_eq!(chunks, ["abcd", "defg", "ghij"]);
    }

    #[test]
    fn recursive_chunks_respect_the_limit_and_keep_words_whole() {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
        let chunks = split(&text, &config(ChunkingStrategy::Recursive, 100, 20), None);
        assert!(chunks.len() > 1);
        for chunk in &chunks {
            assert!(chunk.chars().count() <= 100, "{chunk:?}");
            assert!(
                !chunk.starts_with(' ') && !chunk.ends_with("qu"),
                "{chunk:?}"
            );
        }
    }

    #[test]
    fn sentence_chunks_hold_whole_sentences_with_overlap() {
        let text = "One is first. Two comes next. Three is here. Four ends it.";
        let chunks = split(text, &config(ChunkingStrategy::Sentences, 32, 16), None);
        assert_eq!(
            chunks,
            [
                "One is first. Two comes next.",
                "Two comes next. Three is here.",
                "Three is here. Four ends it."
            ]
        );
        for chunk in &chunks {
            assert!(chunk.ends_with('.'), "{chunk:?}");
        }
    }

    fn document(parent: &str, chunk: usize, chunks: usize, text: &str) -> Document {
        Document {
            id: if chunks == 1 {
                parent.to_owned()
            } else {
                format!("{parent}#{chunk}")
            },
            parent_id: parent.into(),
            chunk,
            chunks,
            text: text.into(),
            timestamp: None,
            metadata: serde_json::Map::new(),
            source_key: None,
        }
    }

    #[test]
    fn texts_the_model_cannot_read_whole_are_split_and_the_record_renumbered() {
        let split = |text: &str| {
            (text.len() > 4).then(|| {
                text.as_bytes()
                    .chunks(4)
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect()
            })
        };
        let fits = vec![document("r", 0, 1, "abc")];
        assert_eq!(fit(fits.clone(), split), fits, "nothing to do");
        let docs = fit(
            vec![document("r", 0, 2, "abcdefgh"), document("r", 1, 2, "ij")],
            split,
        );
        let layout: Vec<(&str, usize, usize, &str)> = docs
            .iter()
            .map(|d| (d.id.as_str(), d.chunk, d.chunks, d.text.as_str()))
            .collect();
        assert_eq!(
            layout,
            [
                ("r#0", 0, 3, "abcd"),
                ("r#1", 1, 3, "efgh"),
                ("r#2", 2, 3, "ij")
            ]
        );
    }
}
