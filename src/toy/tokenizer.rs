//! A CLIP-format BPE vocabulary (vocab.json + merges.txt) for the toy world: CLIP's 512 byte symbols, one merge
//! chain per world word so that each word is one token, then the start and end tokens. Real and toy models go
//! through the same tokenizer code.

use std::collections::BTreeMap;
use std::path::Path;

use crate::Result;
use crate::model::tokenizer::byte_symbols;
use crate::util::write_atomic;

/// How BPE splits `word` (with `</w>` on its last character) under `merges`, lowest rank first.
fn segment(word: &str, merges: &[(String, String)]) -> Vec<String> {
    let mut parts: Vec<String> = word.chars().map(|c| c.to_string()).collect();
    if let Some(last) = parts.last_mut() {
        last.push_str("</w>");
    }
    loop {
        let best = (0..parts.len().saturating_sub(1))
            .filter_map(|i| {
                merges
                    .iter()
                    .position(|(a, b)| *a == parts[i] && *b == parts[i + 1])
                    .map(|r| (r, i))
            })
            .min();
        match best {
            Some((_, i)) => {
                let right = parts.remove(i + 1);
                parts[i].push_str(&right);
            }
            None => return parts,
        }
    }
}

/// Merges under which every word is one token. Merges are only ever appended, so a word's split under the
/// earlier merges is kept and then joined left to right; repeated until no word is split.
fn word_merges(words: &[&str]) -> Vec<(String, String)> {
    let mut merges: Vec<(String, String)> = Vec::new();
    loop {
        let mut changed = false;
        for word in words {
            let parts = segment(word, &merges);
            let mut left = parts[0].clone();
            for right in &parts[1..] {
                merges.push((left.clone(), right.clone()));
                left.push_str(right);
                changed = true;
            }
        }
        if !changed {
            return merges;
        }
    }
}

/// Writes vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json into `folder`.
pub fn write_toy_tokenizer(folder: &Path, words: &[&str]) -> Result<()> {
    let symbols = byte_symbols();
    let mut vocab: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
    vocab.extend(symbols.iter().map(|c| format!("{c}</w>")));
    let merges = word_merges(words);
    vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    let ids: BTreeMap<&str, usize> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    write_atomic(
        &folder.join("vocab.json"),
        serde_json::to_string(&ids)
            .expect("serialisable")
            .as_bytes(),
    )?;
    let mut text = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        text.push_str(&format!("{a} {b}\n"));
    }
    write_atomic(&folder.join("merges.txt"), text.as_bytes())?;
    let special = serde_json::json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    });
    write_atomic(
        &folder.join("special_tokens_map.json"),
        serde_json::to_string_pretty(&special)
            .expect("json")
            .as_bytes(),
    )?;
    let mut config = special.clone();
    config["model_max_length"] = 77.into();
    config["do_lower_case"] = true.into();
    config["tokenizer_class"] = "CLIPTokenizer".into();
    write_atomic(
        &folder.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config)
            .expect("json")
            .as_bytes(),
    )?;
    Ok(())
}

/// Vocabulary size for `words` (what the text encoder's embedding needs).
pub fn toy_vocab_size(words: &[&str]) -> usize {
    512 + word_merges(words).len() + 2
}
