//! The authors' CSV workflow: `stylediffusion_*.csv` read as they are (tuple values in Python literal syntax,
//! lists of tau values meaning a sweep), expanded into one job per case and setting.

use std::path::{Path, PathBuf};

use crate::edit::{EditMode, EditSettings};
use crate::{Error, Result};

/// A Python literal as the CSVs use them: strings, numbers, and lists/tuples of those.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    Str(String),
    Num(f64),
    Seq(Vec<Literal>),
}

impl Literal {
    pub fn parse(text: &str) -> Result<Self> {
        let chars: Vec<char> = text.chars().collect();
        let mut pos = 0;
        let value = parse_value(&chars, &mut pos, text)?;
        skip_ws(&chars, &mut pos);
        if pos != chars.len() {
            return Err(Error::invalid(
                "CSV value",
                format!("{text:?}: unexpected text at character {pos}"),
            ));
        }
        Ok(value)
    }

    fn seq(&self) -> &[Literal] {
        match self {
            Literal::Seq(v) => v,
            other => std::slice::from_ref(other),
        }
    }

    /// All strings inside, flattened.
    pub fn strings(&self) -> Vec<String> {
        match self {
            Literal::Str(s) => vec![s.clone()],
            Literal::Num(_) => vec![],
            Literal::Seq(v) => v.iter().flat_map(Literal::strings).collect(),
        }
    }

    pub fn numbers(&self) -> Vec<f64> {
        match self {
            Literal::Str(_) => vec![],
            Literal::Num(n) => vec![*n],
            Literal::Seq(v) => v.iter().flat_map(Literal::numbers).collect(),
        }
    }
}

fn skip_ws(c: &[char], pos: &mut usize) {
    while *pos < c.len() && c[*pos].is_whitespace() {
        *pos += 1;
    }
}

fn parse_value(c: &[char], pos: &mut usize, text: &str) -> Result<Literal> {
    let bad =
        |m: &str, p: usize| Error::invalid("CSV value", format!("{text:?}: {m} at character {p}"));
    skip_ws(c, pos);
    match c.get(*pos) {
        Some('[') | Some('(') => {
            let close = if c[*pos] == '[' { ']' } else { ')' };
            *pos += 1;
            let mut items = Vec::new();
            loop {
                skip_ws(c, pos);
                if c.get(*pos) == Some(&close) {
                    *pos += 1;
                    return Ok(Literal::Seq(items));
                }
                items.push(parse_value(c, pos, text)?);
                skip_ws(c, pos);
                match c.get(*pos) {
                    Some(',') => *pos += 1,
                    Some(x) if *x == close => {}
                    _ => return Err(bad("expected ',' or a closing bracket", *pos)),
                }
            }
        }
        Some('\'') | Some('"') => {
            let quote = c[*pos];
            *pos += 1;
            let start = *pos;
            while *pos < c.len() && c[*pos] != quote {
                *pos += 1;
            }
            if *pos >= c.len() {
                return Err(bad("unterminated string", start));
            }
            let s: String = c[start..*pos].iter().collect();
            *pos += 1;
            Ok(Literal::Str(s))
        }
        Some(_) => {
            let start = *pos;
            while *pos < c.len()
                && (c[*pos].is_ascii_digit() || matches!(c[*pos], '.' | '-' | '+' | 'e' | 'E'))
            {
                *pos += 1;
            }
            let s: String = c[start..*pos].iter().collect();
            s.parse::<f64>()
                .map(Literal::Num)
                .map_err(|_| bad("expected a number, string or list", start))
        }
        None => Err(bad("unexpected end", *pos)),
    }
}

/// One row of an authors' CSV.
#[derive(Clone, Debug)]
pub struct CsvCase {
    pub case: String,
    pub prompt: String,
    pub image: PathBuf,
    /// Editing settings, one per combination of the tau lists; empty for prompt-only CSVs (inversion only).
    pub edits: Vec<(String, EditSettings)>,
}

/// Image paths are relative to the CSV; as the authors' repository keeps CSVs in data/ beside example_images/,
/// a path not found there is tried from the CSV folder's parent.
fn resolve_image(csv: &Path, rel: &str) -> PathBuf {
    let dir = csv.parent().unwrap_or(Path::new("."));
    let direct = dir.join(rel);
    if direct.exists() {
        return direct;
    }
    match dir.parent() {
        Some(parent) if parent.join(rel).exists() => parent.join(rel),
        _ => direct,
    }
}

/// A case number becomes a folder name (`case_<number>`), so it may hold only letters, digits, `.`, `_` and `-`,
/// may not start with `.`, and is at most 64 characters: nothing in a CSV can point outside the output folder.
pub fn check_case_name(case: &str) -> std::result::Result<(), String> {
    if case.is_empty() {
        return Err("is empty".into());
    }
    if case.len() > 64 {
        return Err(format!("{case:?} is longer than 64 characters"));
    }
    if case.starts_with('.') {
        return Err(format!("{case:?} starts with '.'"));
    }
    if let Some(c) = case
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{case:?} contains {c:?}; case numbers become folder names and may hold only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// SHA-256 (hex) of a value's JSON form: the identity of everything that determines a result.
pub fn fingerprint(value: &impl serde::Serialize) -> String {
    use sha2::Digest;
    let json = serde_json::to_vec(value).expect("serialisable");
    crate::image_io::hex(&sha2::Sha256::digest(&json))
}

pub fn read_csv(path: &Path) -> Result<Vec<CsvCase>> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(|e| Error::file(path, format!("cannot read CSV: {e}")))?;
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| Error::file(path, e.to_string()))?
        .iter()
        .map(str::to_string)
        .collect();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let need = |name: &str| {
        col(name).ok_or_else(|| {
            Error::file(
                path,
                format!("no `{name}` column (columns: {})", headers.join(", ")),
            )
        })
    };
    let (c_case, c_prompt, c_image) = (need("case_number")?, need("prompt")?, need("image_path")?);
    let mut cases = Vec::new();
    for (row_no, record) in reader.records().enumerate() {
        let record = record.map_err(|e| Error::file(path, format!("row {}: {e}", row_no + 2)))?;
        let field = |c: Option<usize>| {
            c.and_then(|c| record.get(c))
                .map(str::trim)
                .filter(|s| !s.is_empty())
        };
        let ctx = |m: String| {
            Error::file(
                path,
                format!(
                    "row {} (case {}): {m}",
                    row_no + 2,
                    record.get(c_case).unwrap_or("?")
                ),
            )
        };
        let lit = |name: &str| -> Result<Option<Literal>> {
            field(col(name))
                .map(Literal::parse)
                .transpose()
                .map_err(|e| ctx(e.to_string()))
        };
        let mut edits = Vec::new();
        if let Some(target) = field(col("target")) {
            let mode = match field(col("edit_type")) {
                Some("Refinement") => EditMode::Refine,
                Some("Replacement") => EditMode::Replace,
                _ => EditMode::Auto,
            };
            let taus = |name: &str, default: f64| -> Result<Vec<f64>> {
                Ok(lit(name)?
                    .map(|l| l.numbers())
                    .filter(|v| !v.is_empty())
                    .unwrap_or(vec![default]))
            };
            let blend = lit("blend_word")?.map(|l| {
                let parts = l.seq().to_vec();
                let words = |k: usize| parts.get(k).map(Literal::strings).unwrap_or_default();
                (words(0), words(1))
            });
            let reweight: Vec<(String, f64)> = match lit("eq_params")? {
                Some(l) => {
                    let parts = l.seq().to_vec();
                    let words = parts.first().map(Literal::strings).unwrap_or_default();
                    let values = parts.get(1).map(Literal::numbers).unwrap_or_default();
                    if words.len() != values.len() {
                        return Err(ctx(format!(
                            "eq_params has {} words and {} values",
                            words.len(),
                            values.len()
                        )));
                    }
                    words.into_iter().zip(values).collect()
                }
                None => vec![],
            };
            for &tv in &taus("tau_v", 0.5)? {
                for &tc in &taus("tau_c", 0.6)? {
                    for &ts in &taus("tau_s", 0.6)? {
                        for &tu in &taus("tau_u", 0.0)? {
                            let mut s = EditSettings::new(target);
                            s.mode = mode;
                            s.blend = blend.clone();
                            s.reweight = reweight.clone();
                            (s.tau_v, s.tau_c, s.tau_s, s.tau_u) = (tv, tc, ts, tu);
                            edits.push((format!("v{tv}_c{tc}_s{ts}_u{tu}"), s));
                        }
                    }
                }
            }
        }
        let case = record.get(c_case).unwrap_or("").trim().to_string();
        check_case_name(&case).map_err(|m| ctx(format!("case_number {m}")))?;
        if let Some(k) = cases.iter().position(|c: &CsvCase| c.case == case) {
            return Err(ctx(format!(
                "case number {case:?} repeats row {}; each case needs its own number (its own folder)",
                k + 2
            )));
        }
        cases.push(CsvCase {
            case,
            prompt: field(Some(c_prompt))
                .ok_or_else(|| ctx("empty prompt".into()))?
                .to_string(),
            image: resolve_image(
                path,
                field(Some(c_image)).ok_or_else(|| ctx("empty image_path".into()))?,
            ),
            edits,
        });
    }
    if cases.is_empty() {
        return Err(Error::file(
            path,
            "holds no cases (no rows below its header)",
        ));
    }
    Ok(cases)
}
