//! From words to token positions, and the token maps between a source and a target prompt (Prompt-to-Prompt's
//! `get_word_inds`, replacement mapper and refinement alignment, with their exact conventions).

use crate::model::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// Token positions (counting the start token as 0) of every occurrence of `word` in `text`, where words are the
/// space-separated parts of the prompt. Empty when the word does not occur.
pub fn word_token_positions(tok: &ClipTokenizer, text: &str, word: &str) -> Result<Vec<usize>> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let wanted: Vec<usize> = words
        .iter()
        .enumerate()
        .filter(|(_, w)| **w == word)
        .map(|(i, _)| i)
        .collect();
    positions_of_word_indices(tok, text, &wanted)
}

/// Token positions of the words at `indices` (P2P's `get_word_inds` with integer word places).
pub fn positions_of_word_indices(
    tok: &ClipTokenizer,
    text: &str,
    indices: &[usize],
) -> Result<Vec<usize>> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let ids = tok.encode_untruncated(text)?;
    let pieces: Vec<String> = ids[1..ids.len() - 1]
        .iter()
        .map(|&id| tok.decode_token(id))
        .collect();
    let (mut out, mut cur_len, mut ptr) = (Vec::new(), 0usize, 0usize);
    for (i, piece) in pieces.iter().enumerate() {
        cur_len += piece.chars().count();
        if indices.contains(&ptr) {
            out.push(i + 1);
        }
        if ptr < words.len() && cur_len >= words[ptr].chars().count() {
            ptr += 1;
            cur_len = 0;
        }
    }
    Ok(out)
}

/// The positions of `word`, or an error naming the word and the prompt.
pub fn require_word(tok: &ClipTokenizer, text: &str, word: &str) -> Result<Vec<usize>> {
    let found = word_token_positions(tok, text, word)?;
    if found.is_empty() {
        return Err(Error::invalid(
            "word",
            format!("{word:?} is not a word of the prompt {text:?}"),
        ));
    }
    Ok(found)
}

/// Replace: a `len x len` matrix M (row-major) with target attention = source attention x M. The prompts must
/// have the same number of words; words whose token counts differ share the source attention evenly.
pub fn replacement_mapper(
    tok: &ClipTokenizer,
    source: &str,
    target: &str,
    len: usize,
) -> Result<Vec<f32>> {
    let (wx, wy): (Vec<&str>, Vec<&str>) = (
        source.split_whitespace().collect(),
        target.split_whitespace().collect(),
    );
    if wx.len() != wy.len() {
        return Err(Error::invalid(
            "edit mode replace",
            format!(
                "replace needs prompts with the same number of words, but {source:?} has {} and {target:?} has {} (use mode refine for added words)",
                wx.len(),
                wy.len()
            ),
        ));
    }
    let replaced: Vec<usize> = (0..wy.len()).filter(|&i| wx[i] != wy[i]).collect();
    let src_inds: Vec<Vec<usize>> = replaced
        .iter()
        .map(|&i| positions_of_word_indices(tok, source, &[i]))
        .collect::<Result<_>>()?;
    let tgt_inds: Vec<Vec<usize>> = replaced
        .iter()
        .map(|&i| positions_of_word_indices(tok, target, &[i]))
        .collect::<Result<_>>()?;
    let mut m = vec![0f32; len * len];
    let (mut i, mut j, mut cur) = (0usize, 0usize, 0usize);
    while i < len && j < len {
        if cur < src_inds.len() && src_inds[cur].first() == Some(&i) {
            let (s, t) = (&src_inds[cur], &tgt_inds[cur]);
            if s.len() == t.len() {
                for (&a, &b) in s.iter().zip(t) {
                    m[a * len + b] = 1.0;
                }
            } else {
                let ratio = 1.0 / t.len() as f32;
                for &a in s {
                    for &b in t {
                        m[a * len + b] = ratio;
                    }
                }
            }
            cur += 1;
            i += s.len();
            j += t.len();
        } else if cur < src_inds.len() {
            m[i * len + j] = 1.0;
            i += 1;
            j += 1;
        } else {
            // As the reference: once every replaced word is placed, the rest maps position j to itself.
            m[j * len + j] = 1.0;
            i += 1;
            j += 1;
        }
    }
    Ok(m)
}

/// Refine: for each target token position, the source position it copies attention from, and whether it has
/// one (new words keep their own attention). Global alignment of the token sequences (match 1, mismatch -1,
/// gap 0), traced back with P2P's tie-breaking.
pub fn refinement_mapper(
    tok: &ClipTokenizer,
    source: &str,
    target: &str,
    len: usize,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let x = tok.encode_untruncated(source)?;
    let y = tok.encode_untruncated(target)?;
    let (n, m) = (x.len(), y.len());
    // Gap score 0: the first row and column stay 0.
    let mut score = vec![vec![0i32; m + 1]; n + 1];
    let mut trace = vec![vec![0u8; m + 1]; n + 1];
    for cell in trace[0].iter_mut().skip(1) {
        *cell = 1;
    }
    for row in trace.iter_mut().skip(1) {
        row[0] = 2;
    }
    trace[0][0] = 4;
    for i in 1..=n {
        for j in 1..=m {
            let left = score[i][j - 1];
            let up = score[i - 1][j];
            let diag = score[i - 1][j - 1] + if x[i - 1] == y[j - 1] { 1 } else { -1 };
            let best = left.max(up).max(diag);
            score[i][j] = best;
            trace[i][j] = if best == left {
                1
            } else if best == up {
                2
            } else {
                3
            };
        }
    }
    let (mut i, mut j) = (n, m);
    let mut pairs: Vec<(usize, Option<usize>)> = Vec::new();
    while i > 0 || j > 0 {
        match trace[i][j] {
            3 => {
                i -= 1;
                j -= 1;
                pairs.push((j, Some(i)));
            }
            1 => {
                j -= 1;
                pairs.push((j, None));
            }
            2 => i -= 1,
            _ => break,
        }
    }
    pairs.reverse();
    if m > len {
        return Err(Error::invalid(
            "target prompt",
            format!("{target:?} has {m} tokens, more than {len}"),
        ));
    }
    let mut mapper: Vec<usize> = (0..len).collect();
    let mut alphas = vec![1f32; len];
    for (k, (_, src)) in pairs.iter().enumerate() {
        mapper[k] = src.unwrap_or(0);
        alphas[k] = if src.is_some() { 1.0 } else { 0.0 };
    }
    // As the reference: positions past the aligned tokens map to len(y) + offset, i.e. to themselves.
    for (k, slot) in mapper.iter_mut().enumerate().skip(pairs.len()) {
        *slot = m + (k - pairs.len());
    }
    Ok((mapper, alphas))
}
