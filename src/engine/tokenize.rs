//! Tokenization with the model's `tokenizer.json` (Hugging Face `tokenizers`), and padded batches.
//!
//! Texts are tokenized once into [`TokenIds`] (truncated to `max_len`, special tokens added, no
//! padding); a [`Batch`] pads any selection of them to the longest row and carries the attention mask, so
//! training re-batches without re-tokenizing.

use super::error::{EngineError, EngineResult, LoadError};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use tokenizers::{Tokenizer, TruncationParams};

/// The default maximum sequence length (all-MiniLM-L6-v2's tokenizer.json presets 128).
pub const DEFAULT_MAX_LEN: usize = 128;

/// Token ids of one text (special tokens included, truncated, unpadded).
pub type TokenIds = Vec<u32>;

/// A tokenizer loaded from `tokenizer.json`.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The same tokenizer without truncation (a decoder's rendered prompts, its verbalizers).
    full: Tokenizer,
    pad_id: u32,
    max_len: usize,
    path: PathBuf,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("max_len", &self.max_len)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl TextTokenizer {
    /// Load `tokenizer.json`; texts are truncated to `max_len` tokens (special tokens included).
    pub fn from_file(path: &Path, max_len: usize) -> EngineResult<TextTokenizer> {
        if max_len < 2 {
            return Err(EngineError::InvalidArgument(format!(
                "max_len {max_len} is too small (at least 2 for the special tokens)"
            )));
        }
        let inner = Tokenizer::from_file(path).map_err(|e| LoadError::Tokenizer {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| inner.token_to_id("[PAD]"))
            .or_else(|| inner.token_to_id("<pad>"))
            .unwrap_or(0);
        TextTokenizer::from_tokenizer(inner, pad_id, max_len, path)
    }

    /// Wrap a tokenizer built in memory (e.g. from GGUF metadata); `path` names its source in errors.
    pub fn from_tokenizer(
        mut inner: Tokenizer,
        pad_id: u32,
        max_len: usize,
        path: &Path,
    ) -> EngineResult<TextTokenizer> {
        if max_len < 2 {
            return Err(EngineError::InvalidArgument(format!(
                "max_len {max_len} is too small (at least 2)"
            )));
        }
        inner.with_padding(None);
        let mut full = inner.clone();
        full.with_truncation(None)
            .map_err(|e| LoadError::Tokenizer {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| LoadError::Tokenizer {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(TextTokenizer {
            inner,
            full,
            pad_id,
            max_len,
            path: path.to_path_buf(),
        })
    }

    /// The longest prefix of `text` whose tokens (no special tokens) are its first `max_len` tokens: the
    /// text cut where its `max_len`-th token ends (at a character boundary).
    pub fn truncate_text<'a>(&self, text: &'a str) -> EngineResult<&'a str> {
        let enc = self
            .full
            .encode(text, false)
            .map_err(|e| EngineError::Tokenize(e.to_string()))?;
        if enc.len() <= self.max_len {
            return Ok(text);
        }
        let mut end = enc.get_offsets()[self.max_len - 1].1.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Ok(&text[..end])
    }

    /// Tokenize without special tokens and without truncation (a decoder's prompts and verbalizers).
    pub fn tokenize_full<S: AsRef<str>>(&self, texts: &[S]) -> EngineResult<Vec<TokenIds>> {
        encode(&self.full, texts, false)
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Tokenize texts (in parallel; the result does not depend on the thread count).
    pub fn tokenize<S: AsRef<str>>(&self, texts: &[S]) -> EngineResult<Vec<TokenIds>> {
        encode(&self.inner, texts, true)
    }

    /// Tokenize and pad in one go.
    pub fn batch<S: AsRef<str>>(&self, texts: &[S], device: &Device) -> EngineResult<Batch> {
        let ids = self.tokenize(texts)?;
        let rows: Vec<&[u32]> = ids.iter().map(|r| r.as_slice()).collect();
        Batch::pad(&rows, self.pad_id, device)
    }
}

fn encode<S: AsRef<str>>(
    tok: &Tokenizer,
    texts: &[S],
    special: bool,
) -> EngineResult<Vec<TokenIds>> {
    let inputs: Vec<&str> = texts.iter().map(|s| s.as_ref()).collect();
    let encs = tok
        .encode_batch(inputs, special)
        .map_err(|e| EngineError::Tokenize(e.to_string()))?;
    Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
}

/// A padded batch: token ids (B, S) u32 and attention mask (B, S) f32 (1 = token, 0 = padding).
#[derive(Debug, Clone)]
pub struct Batch {
    pub ids: Tensor,
    pub mask: Tensor,
    /// Real length of each row.
    pub lengths: Vec<usize>,
}

impl Batch {
    /// Pad rows to the longest (right padding with `pad_id`).
    pub fn pad(rows: &[&[u32]], pad_id: u32, device: &Device) -> EngineResult<Batch> {
        if rows.is_empty() {
            return Err(EngineError::InvalidArgument("an empty batch".into()));
        }
        let s = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
        let b = rows.len();
        let mut ids = vec![pad_id; b * s];
        let mut mask = vec![0f32; b * s];
        for (i, r) in rows.iter().enumerate() {
            ids[i * s..i * s + r.len()].copy_from_slice(r);
            mask[i * s..i * s + r.len()]
                .iter_mut()
                .for_each(|m| *m = 1.0);
        }
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, s), device)?,
            mask: Tensor::from_vec(mask, (b, s), device)?,
            lengths: rows.iter().map(|r| r.len()).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }
}

/// Split token rows into padded batches of at most `batch_size` rows, in order.
pub fn batches(
    rows: &[TokenIds],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> EngineResult<Vec<Batch>> {
    let bs = batch_size.max(1);
    rows.chunks(bs)
        .map(|c| {
            let r: Vec<&[u32]> = c.iter().map(|r| r.as_slice()).collect();
            Batch::pad(&r, pad_id, device)
        })
        .collect()
}
