//! CLIP's BPE tokenizer (lower-casing, whitespace clean-up, byte-level BPE with `</w>` word ends), read from
//! an SD `tokenizer/` folder: vocab.json + merges.txt as the published SD folders ship it, or tokenizer.json.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::{Error, Result};

pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// CLIP's word split: contractions, runs of letters, single digits, runs of other non-space characters.
const CLIP_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// GPT-2/CLIP's reversible byte -> printable character table, in CLIP's vocabulary order.
pub fn byte_symbols() -> Vec<char> {
    let mut bs: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    cs.into_iter()
        .map(|c| char::from_u32(c).expect("valid code point"))
        .collect()
}

#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
}

fn wrap(folder: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::file(folder, format!("{what}: {e}"))
}

/// A special token in tokenizer_config.json / special_tokens_map.json: a string or `{"content": ...}`.
fn token_field(value: &serde_json::Value, key: &str) -> Option<String> {
    match value.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        other => other.get("content")?.as_str().map(str::to_string),
    }
}

impl ClipTokenizer {
    pub fn from_folder(folder: &Path) -> Result<Self> {
        let json = folder.join("tokenizer.json");
        let (vocab, merges) = (folder.join("vocab.json"), folder.join("merges.txt"));
        let inner = if vocab.is_file() && merges.is_file() {
            Self::from_bpe_files(folder, &vocab, &merges)?
        } else if json.is_file() {
            let mut t =
                Tokenizer::from_file(&json).map_err(|e| wrap(&json, "cannot read tokenizer", e))?;
            t.with_padding(None);
            t.with_truncation(None)
                .map_err(|e| wrap(&json, "cannot disable truncation", e))?;
            t
        } else {
            return Err(Error::file(
                folder,
                "no tokenizer: expected vocab.json + merges.txt, or tokenizer.json",
            ));
        };
        let mut settings = serde_json::Value::Null;
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let p = folder.join(name);
            if p.is_file() {
                let v: serde_json::Value = crate::model::config::read_json(&p)?;
                if settings.is_null() {
                    settings = v;
                } else if let (Some(base), Some(extra)) = (settings.as_object_mut(), v.as_object())
                {
                    for (k, val) in extra {
                        base.insert(k.clone(), val.clone());
                    }
                }
            }
        }
        let id = |token: &str| -> Result<u32> {
            inner.token_to_id(token).ok_or_else(|| {
                Error::file(folder, format!("the vocabulary has no token `{token}`"))
            })
        };
        let bos = id(&token_field(&settings, "bos_token").unwrap_or_else(|| START_OF_TEXT.into()))?;
        let eos = id(&token_field(&settings, "eos_token").unwrap_or_else(|| END_OF_TEXT.into()))?;
        let pad = match token_field(&settings, "pad_token") {
            Some(p) => id(&p)?,
            None => eos,
        };
        let max_length = settings
            .get("model_max_length")
            .and_then(|v| v.as_u64())
            .filter(|&n| n > 2 && n <= 4096)
            .map(|n| n as usize)
            .unwrap_or(77);
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_length,
        })
    }

    fn from_bpe_files(folder: &Path, vocab: &Path, merges: &Path) -> Result<Tokenizer> {
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .end_of_word_suffix("</w>".into())
            .unk_token(END_OF_TEXT.into())
            .build()
            .map_err(|e| wrap(folder, "cannot read vocab.json/merges.txt", e))?;
        let normalizer = NormalizerSequence::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Replace(
                Replace::new(
                    tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                    " ",
                )
                .map_err(|e| wrap(folder, "normalizer", e))?,
            ),
            NormalizerWrapper::Lowercase(Lowercase),
        ]);
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| wrap(folder, "pre-tokenizer", e))?;
        let pre = PreTokenizerSequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ]);
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(|e| wrap(folder, "normalizer", e))?;
        tokenizer.with_pre_tokenizer(Some(pre));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        tokenizer
            .add_special_tokens([
                AddedToken::from(START_OF_TEXT, true),
                AddedToken::from(END_OF_TEXT, true),
            ])
            .map_err(|e| wrap(folder, "special tokens", e))?;
        Ok(tokenizer)
    }

    /// Start token, the prompt's tokens, end token; not truncated or padded.
    pub fn encode_untruncated(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::invalid("prompt", format!("cannot tokenize {text:?}: {e}")))?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 2);
        ids.push(self.bos);
        ids.extend_from_slice(enc.get_ids());
        ids.push(self.eos);
        Ok(ids)
    }

    /// Exactly `max_length` (77) ids: truncated to keep the end token, padded with the pad token.
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_untruncated(text)?;
        if ids.len() > self.max_length {
            ids.truncate(self.max_length - 1);
            ids.push(self.eos);
        }
        ids.resize(self.max_length, self.pad);
        Ok(ids)
    }

    /// Refuses a prompt longer than the text encoder reads: CLIP would silently drop its last words, and an edit
    /// of a dropped word would do nothing. The error gives the count and the words that would be cut.
    pub fn check_length(&self, text: &str) -> Result<()> {
        let ids = self.encode_untruncated(text)?;
        if ids.len() <= self.max_length {
            return Ok(());
        }
        let cut: String = ids[self.max_length - 1..ids.len() - 1]
            .iter()
            .map(|&i| self.inner.id_to_token(i).unwrap_or_default())
            .collect::<String>()
            .replace("</w>", " ");
        Err(Error::invalid(
            "prompt",
            format!(
                "{} tokens with its start and end tokens, but the text encoder reads {}; these words would be cut: {:?}. Shorten the prompt",
                ids.len(),
                self.max_length,
                cut.trim()
            ),
        ))
    }

    /// The token strings of a prompt, without start/end tokens (for mapping words to token positions).
    pub fn tokens(&self, text: &str) -> Result<Vec<String>> {
        let ids = self.encode_untruncated(text)?;
        Ok(ids[1..ids.len() - 1]
            .iter()
            .map(|&i| self.inner.id_to_token(i).unwrap_or_default())
            .collect())
    }

    /// The text a token stands for, without its `</w>` word-end mark (as transformers' decode of one id).
    pub fn decode_token(&self, id: u32) -> String {
        let token = self.inner.id_to_token(id).unwrap_or_default();
        let symbols = byte_symbols();
        let bytes: Vec<u8> = token
            .trim_end_matches("</w>")
            .chars()
            .map(|c| {
                symbols
                    .iter()
                    .position(|s| *s == c)
                    .map_or(b'?', byte_of_symbol)
            })
            .collect();
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos(&self) -> u32 {
        self.bos
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }
}

/// The byte a position of [`byte_symbols`] stands for.
fn byte_of_symbol(position: usize) -> u8 {
    let mut bs: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
        }
    }
    bs[position] as u8
}
