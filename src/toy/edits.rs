//! Edits of toy scenes: the single-word changes of a caption (colour, shape, style, background), each valid
//! under the world's rules.

use super::world::{Color, SceneSpec, Shape, Style};

/// What kind of word an edit changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EditKind {
    Color,
    Shape,
    Style,
    /// A style word where there was none ("a red circle" -> "a striped red circle").
    AddStyle,
    Background,
}

impl EditKind {
    pub fn name(self) -> &'static str {
        match self {
            EditKind::Color => "color",
            EditKind::Shape => "shape",
            EditKind::Style => "style",
            EditKind::AddStyle => "add-style",
            EditKind::Background => "background",
        }
    }
}

/// Every valid scene that differs from `spec` by one word, with what changed and which object (None = background).
pub fn single_word_edits_with_kind(spec: &SceneSpec) -> Vec<(SceneSpec, EditKind, Option<usize>)> {
    let mut out = Vec::new();
    for (k, obj) in spec.objects.iter().enumerate() {
        for &c in Color::OBJECT {
            if c != obj.color && c != spec.background {
                let mut s = spec.clone();
                s.objects[k].color = c;
                out.push((s, EditKind::Color, Some(k)));
            }
        }
        for &sh in Shape::ALL {
            if sh != obj.shape {
                let mut s = spec.clone();
                s.objects[k].shape = sh;
                out.push((s, EditKind::Shape, Some(k)));
            }
        }
        for &st in &Style::ALL[1..] {
            if st != obj.style {
                let mut s = spec.clone();
                s.objects[k].style = st;
                let kind = if obj.style == Style::Plain {
                    EditKind::AddStyle
                } else {
                    EditKind::Style
                };
                out.push((s, kind, Some(k)));
            }
        }
    }
    for &bg in Color::ALL {
        if bg != spec.background && spec.objects.iter().all(|o| o.color != bg) {
            let mut s = spec.clone();
            s.background = bg;
            out.push((s, EditKind::Background, None));
        }
    }
    out
}

pub fn single_word_edits(spec: &SceneSpec) -> Vec<SceneSpec> {
    single_word_edits_with_kind(spec)
        .into_iter()
        .map(|(s, ..)| s)
        .collect()
}

/// How Prompt-to-Prompt should run an edit: replace (same word count) or refine (words added), and the words
/// whose attention makes the local-blend mask (in the source and the target prompt).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct P2pSettings {
    pub mode: crate::edit::EditMode,
    pub blend_source: String,
    pub blend_target: String,
}

/// A checked edit: source and target scenes and what changed.
#[derive(Clone, Debug)]
pub struct EditPair {
    pub source: SceneSpec,
    pub target: SceneSpec,
    pub kind: EditKind,
    /// The edited object, or None for a background edit.
    pub object: Option<usize>,
}

impl EditPair {
    /// Accepts `target` only when it is one of `source`'s single-word edits; the error says why not.
    pub fn new(source: &SceneSpec, target: &SceneSpec) -> crate::Result<Self> {
        let bad = |m: String| {
            crate::Error::invalid(
                "target",
                format!(
                    "{:?} is not an edit of {:?}: {m}",
                    target.caption(),
                    source.caption()
                ),
            )
        };
        if source == target {
            return Err(bad("it is the same caption".into()));
        }
        if source.objects.len() != target.objects.len() {
            return Err(bad("the number of objects differs".into()));
        }
        match single_word_edits_with_kind(source).into_iter().find(|(s, ..)| s == target) {
            Some((_, kind, object)) => Ok(Self {
                source: source.clone(),
                target: target.clone(),
                kind,
                object,
            }),
            None => Err(bad(
                "edits change one word: a colour, shape or style of one object, add a style word, or the background".into(),
            )),
        }
    }

    pub fn p2p(&self) -> P2pSettings {
        let (src, tgt) = match self.object {
            Some(k) => (
                self.source.objects[k].shape.word(),
                self.target.objects[k].shape.word(),
            ),
            None => ("background", "background"),
        };
        P2pSettings {
            mode: if self.kind == EditKind::AddStyle {
                crate::edit::EditMode::Refine
            } else {
                crate::edit::EditMode::Replace
            },
            blend_source: src.to_string(),
            blend_target: tgt.to_string(),
        }
    }
}
