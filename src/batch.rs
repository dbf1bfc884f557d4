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

/// The authors tuned their CSVs' taus at this many DDIM steps, on Stable Diffusion v1.4.
pub const AUTHORS_STEPS: usize = 30;

/// Where one case's files go under the batch folder.
pub struct CaseFiles {
    pub dir: PathBuf,
}

impl CaseFiles {
    pub fn new(out_dir: &Path, case: &CsvCase) -> Self {
        Self {
            dir: out_dir.join(format!("case_{}", case.case)),
        }
    }

    pub fn inversion(&self) -> PathBuf {
        self.dir.join("inversion.safetensors")
    }

    pub fn edit(&self, variant: &str) -> PathBuf {
        self.dir.join(format!("edit_{variant}.png"))
    }

    pub fn grid(&self, variant: &str) -> PathBuf {
        self.dir.join(format!("grid_{variant}.png"))
    }

    /// The record that proves an edit matches its inputs.
    pub fn record(&self, variant: &str) -> PathBuf {
        crate::invert::artifact::sidecar(&self.edit(variant))
    }
}

/// The results table of a batch folder.
pub fn results_path(out_dir: &Path) -> PathBuf {
    out_dir.join("results.csv")
}

/// Registers every file a batch writes in `plan` (each case's inversion and its metadata, each edit, grid and
/// record, the results table) and every photo as an input, so all are checked before any work.
pub fn plan_outputs(
    plan: &mut crate::outputs::OutputPlan,
    cases: &[CsvCase],
    out_dir: &Path,
) -> Result<()> {
    for case in cases {
        plan.input(&format!("image of case {}", case.case), &case.image)?;
    }
    plan.output("results table", &results_path(out_dir))?;
    for case in cases {
        let files = CaseFiles::new(out_dir, case);
        let inv = files.inversion();
        let what = format!("inversion of case {}", case.case);
        plan.output(&what, &inv)?;
        plan.output(
            &format!("metadata of {what}"),
            &crate::invert::artifact::sidecar(&inv),
        )?;
        for (variant, _) in &case.edits {
            let c = &case.case;
            plan.image_output(&format!("edit {variant} of case {c}"), &files.edit(variant))?;
            plan.image_output(&format!("grid {variant} of case {c}"), &files.grid(variant))?;
            plan.output(
                &format!("record of edit {variant} of case {c}"),
                &files.record(variant),
            )?;
        }
    }
    Ok(())
}

/// Everything cheap about a batch, before any network runs: every photo decodes, every prompt fits, every edit's
/// numbers and words are valid. Returns the photos (squared to the model's size) or every problem found.
pub fn prepare(
    editor: &crate::Editor,
    cases: &[CsvCase],
    settings: &crate::InversionSettings,
) -> std::result::Result<Vec<image::RgbImage>, Vec<String>> {
    let mut problems = Vec::new();
    let mut photos = Vec::new();
    for case in cases {
        let c = &case.case;
        match crate::image_io::load_square_rgb(&case.image, editor.native_size()) {
            Ok(rgb) => photos.push(rgb),
            Err(e) => problems.push(format!("case {c}: {e}")),
        }
        if let Err(e) = editor.check_inversion(&case.prompt, settings) {
            problems.push(format!("case {c}: {e}"));
        }
        for (variant, edit) in &case.edits {
            if let Err(e) = editor.check_edit(&case.prompt, settings.steps, edit) {
                problems.push(format!("case {c} edit {variant}: {e}"));
            }
        }
    }
    if problems.is_empty() {
        Ok(photos)
    } else {
        Err(problems)
    }
}

/// One line of results.csv.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ResultRow {
    pub case: String,
    pub variant: String,
    pub prompt: String,
    pub target: String,
    pub method: String,
    pub recon_psnr: String,
    pub status: String,
    pub output: String,
}

/// What a finished edit records beside its image, so a rerun can prove the image matches its inputs.
#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct EditRecord {
    fingerprint: String,
    image_sha256: String,
    settings: serde_json::Value,
}

fn write_results(path: &Path, rows: &[ResultRow]) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)
            .map_err(|e| Error::file(path, format!("cannot write row: {e}")))?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| Error::file(path, format!("cannot write table: {e}")))?;
    crate::util::write_atomic(path, &bytes)
}

fn bytes_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    crate::image_io::hex(&sha2::Sha256::digest(bytes))
}

/// The finished edit at `out`, when its record proves it was made from this inversion with these settings.
fn edit_is_current(out: &Path, record: &Path, fingerprint: &str) -> bool {
    let (Ok(text), Ok(png)) = (std::fs::read_to_string(record), std::fs::read(out)) else {
        return false;
    };
    serde_json::from_str::<EditRecord>(&text)
        .is_ok_and(|r| r.fingerprint == fingerprint && r.image_sha256 == bytes_sha256(&png))
}

/// What a batch run reports as it goes.
pub enum BatchEvent<'a> {
    /// A case's inversion or edit is about to run.
    Started { case: &'a str, job: &'a str },
    /// Progress within the running job.
    Progress(&'a crate::Progress),
    /// A job ended: done, skipped (done before with the same inputs) or failed.
    Finished { row: &'a ResultRow },
}

/// How a batch went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchSummary {
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
    /// Inversions plus edits.
    pub jobs: usize,
}

/// Runs every case: its inversion (skipped when the artifact on disk provably matches the model, the photo's
/// pixels, the prompt and the settings), then each edit (skipped when its record matches the inversion file, the
/// edit settings and this stylediff version). A failed job is recorded and the batch goes on; results.csv is
/// rewritten after every case. `photos` come from [`prepare`]. Cancelling stops at the next UNet evaluation with
/// [`Error::Cancelled`], the finished cases kept.
pub fn run(
    editor: &crate::Editor,
    cases: &[CsvCase],
    photos: &[image::RgbImage],
    settings: &crate::InversionSettings,
    out_dir: &Path,
    cancel: &crate::CancelToken,
    on_event: &mut dyn FnMut(BatchEvent),
) -> Result<BatchSummary> {
    use crate::invert::artifact;
    let results = results_path(out_dir);
    let mut rows: Vec<ResultRow> = Vec::new();
    let mut summary = BatchSummary {
        jobs: cases.iter().map(|c| 1 + c.edits.len()).sum(),
        ..Default::default()
    };
    let method = settings.method.name();
    for (case, photo) in cases.iter().zip(photos) {
        let files = CaseFiles::new(out_dir, case);
        let inv_path = files.inversion();
        let row =
            |variant: &str, target: &str, psnr: String, status: String, output: &Path| ResultRow {
                case: case.case.clone(),
                variant: variant.into(),
                prompt: case.prompt.clone(),
                target: target.into(),
                method: method.into(),
                recon_psnr: psnr,
                status,
                output: output.display().to_string(),
            };
        let skipped = "skipped (done before with the same inputs)".to_string();
        let pixels = crate::image_io::pixels_sha256(photo);
        let previous = artifact::load(&inv_path, &editor.model().device)
            .ok()
            .filter(|inv| {
                inv.image_sha256 == pixels
                    && inv.source_prompt == case.prompt
                    && inv.settings == *settings
                    && inv.check_fits(editor.model()).is_ok()
            });
        let inv = match previous {
            Some(inv) => {
                summary.skipped += 1;
                rows.push(row(
                    "inversion",
                    "",
                    format!("{:.2}", inv.recon_psnr),
                    skipped.clone(),
                    &inv_path,
                ));
                inv
            }
            None => {
                on_event(BatchEvent::Started {
                    case: &case.case,
                    job: "inversion",
                });
                let mut monitor = crate::Monitor::new(|p| on_event(BatchEvent::Progress(p)))
                    .with_cancel(cancel.clone());
                let result = editor
                    .invert(photo, &case.prompt, settings, &mut monitor)
                    .and_then(|inv| artifact::save(&inv, &inv_path).map(|_| inv));
                drop(monitor);
                match result {
                    Ok(inv) => {
                        summary.done += 1;
                        rows.push(row(
                            "inversion",
                            "",
                            format!("{:.2}", inv.recon_psnr),
                            "done".into(),
                            &inv_path,
                        ));
                        inv
                    }
                    Err(Error::Cancelled) => {
                        write_results(&results, &rows)?;
                        return Err(Error::Cancelled);
                    }
                    Err(e) => {
                        summary.failed += 1 + case.edits.len();
                        rows.push(row(
                            "inversion",
                            "",
                            String::new(),
                            format!("failed: {e}"),
                            Path::new(""),
                        ));
                        on_event(BatchEvent::Finished {
                            row: rows.last().expect("pushed"),
                        });
                        write_results(&results, &rows)?;
                        continue;
                    }
                }
            }
        };
        on_event(BatchEvent::Finished {
            row: rows.last().expect("pushed"),
        });
        let inversion_sha = crate::image_io::file_sha256(&inv_path)?;
        let psnr = format!("{:.2}", inv.recon_psnr);
        for (variant, edit) in &case.edits {
            let out = files.edit(variant);
            let record_path = files.record(variant);
            let fingerprint = fingerprint(&(&inversion_sha, edit, env!("CARGO_PKG_VERSION")));
            if edit_is_current(&out, &record_path, &fingerprint) {
                summary.skipped += 1;
                rows.push(row(
                    variant,
                    &edit.target,
                    psnr.clone(),
                    skipped.clone(),
                    &out,
                ));
                on_event(BatchEvent::Finished {
                    row: rows.last().expect("pushed"),
                });
                continue;
            }
            on_event(BatchEvent::Started {
                case: &case.case,
                job: variant,
            });
            let mut monitor = crate::Monitor::new(|p| on_event(BatchEvent::Progress(p)))
                .with_cancel(cancel.clone());
            let result = editor.edit(&inv, edit, &mut monitor).and_then(|e| {
                let edited = e.edited_image()?;
                let grid = crate::viz::comparison_row(&inv.image, &e.reconstruction, &e.edited)?;
                let settings = crate::outputs::edit_record(&inv, edit);
                crate::util::save_image_with_settings(&files.grid(variant), &grid, &settings)?;
                crate::util::save_image_with_settings(&out, &edited, &settings)?;
                let png = std::fs::read(&out).map_err(|source| Error::Io {
                    path: out.clone(),
                    source,
                })?;
                let record = EditRecord {
                    fingerprint: fingerprint.clone(),
                    image_sha256: bytes_sha256(&png),
                    settings,
                };
                crate::util::write_atomic(
                    &record_path,
                    serde_json::to_string_pretty(&record)
                        .expect("serialisable")
                        .as_bytes(),
                )
            });
            drop(monitor);
            let status = match result {
                Ok(()) => {
                    summary.done += 1;
                    "done".to_string()
                }
                Err(Error::Cancelled) => {
                    write_results(&results, &rows)?;
                    return Err(Error::Cancelled);
                }
                Err(e) => {
                    summary.failed += 1;
                    format!("failed: {e}")
                }
            };
            rows.push(row(variant, &edit.target, psnr.clone(), status, &out));
            on_event(BatchEvent::Finished {
                row: rows.last().expect("pushed"),
            });
        }
        write_results(&results, &rows)?;
    }
    write_results(&results, &rows)?;
    Ok(summary)
}
