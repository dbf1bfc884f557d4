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

/// Registers every file a batch (or one shard of it) writes in `plan` (each case's inversion and its metadata,
/// each edit, grid and record, the run's results table, the manifest) and every photo as an input, so all are checked before any work.
pub fn plan_outputs(
    plan: &mut crate::outputs::OutputPlan,
    cases: &[CsvCase],
    out_dir: &Path,
    shard: crate::shard::Shard,
) -> Result<()> {
    for case in cases {
        plan.input(&format!("image of case {}", case.case), &case.image)?;
    }
    plan.output("results table", &results_path_for(out_dir, shard))?;
    plan.output("batch manifest", &manifest_path(out_dir))?;
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
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// Another process holds this case's lock (the same shard started twice, or shards of different counts over
    /// one folder); the case is left until the end and then waited for.
    Busy {
        case: &'a str,
        holder: &'a crate::lock::Holder,
    },
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

// ---------------------------------------------------------------------------------------------------------------
// Shards: which cases a machine runs, and the folder's record of what they are computed with.

/// The expected cost of a case in UNet evaluations (a backward pass counted as two): its inversion (DDIM
/// inversion, the method's optimisation, the reconstruction) plus its edits (source and target, each guided).
pub fn case_cost(case: &CsvCase, settings: &crate::InversionSettings) -> f64 {
    use crate::invert::Method;
    let steps = settings.steps as f64;
    let optimise: f64 = match settings.method {
        Method::StyleDiffusion | Method::NullText => (0..settings.steps)
            .map(|i| 3.0 * settings.inner_at(i) as f64 + 2.0)
            .sum(),
        Method::NegativePrompt | Method::Ddim => 0.0,
    };
    let inversion = steps + optimise + 2.0 * steps;
    inversion + case.edits.len() as f64 * 4.0 * steps
}

/// The cases as the partition sees them: identity (the case number, which also names the case's folder) and cost.
pub fn shard_items(
    cases: &[CsvCase],
    settings: &crate::InversionSettings,
) -> Vec<crate::shard::Item> {
    cases
        .iter()
        .map(|c| crate::shard::Item {
            id: c.case.clone(),
            cost: case_cost(c, settings),
        })
        .collect()
}

/// The shard (0-based) of every case, for `count` shards.
pub fn partition(
    cases: &[CsvCase],
    settings: &crate::InversionSettings,
    count: usize,
) -> Vec<usize> {
    crate::shard::partition(&shard_items(cases, settings), count)
}

/// The cases of one shard, in the CSV's order.
pub fn shard_cases(
    cases: &[CsvCase],
    settings: &crate::InversionSettings,
    shard: crate::shard::Shard,
) -> Vec<CsvCase> {
    let part = partition(cases, settings, shard.count);
    cases
        .iter()
        .zip(part)
        .filter(|(_, s)| *s == shard.index)
        .map(|(c, _)| c.clone())
        .collect()
}

/// What a batch folder's cases are computed with, written by every shard to `batch.json` so `batch merge` can
/// prove each case's record current without loading the model, and print the command that finishes the batch.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub stylediff_version: String,
    pub model_id: String,
    pub settings: crate::InversionSettings,
    /// The CSV as the shard that wrote this saw it.
    pub csv: String,
    pub csv_sha256: String,
    /// The shard count of the run that wrote this.
    pub shards: usize,
    /// The command line that runs a shard of this batch, without its shard (`--shard I/N` is appended).
    pub command: Vec<String>,
}

pub fn manifest_path(out_dir: &Path) -> PathBuf {
    out_dir.join("batch.json")
}

pub fn read_manifest(out_dir: &Path) -> Result<Option<Manifest>> {
    let path = manifest_path(out_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::file(&path, format!("not a batch manifest: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io { path, source }),
    }
}

/// Writes the folder's manifest. Shards of one batch must agree on the model and the settings: a shard that finds
/// another model or other settings recorded refuses to start (a batch of other settings is running or was run
/// there). A whole (unsharded) run replaces the record, as it replaces the results.
pub fn write_manifest(out_dir: &Path, manifest: &Manifest, sharded: bool) -> Result<()> {
    if sharded
        && let Some(old) = read_manifest(out_dir)?
        && (old.model_id != manifest.model_id || old.settings != manifest.settings)
    {
        return Err(Error::file(
            manifest_path(out_dir),
            format!(
                "this folder holds a batch of {} (model {}); this shard runs {} (model {}). Shards of one batch \
                 share model and settings: use another --out-dir, or delete this file to start over here (finished \
                 cases that match the new settings are kept)",
                serde_json::to_string(&old.settings).unwrap_or_default(),
                old.model_id,
                serde_json::to_string(&manifest.settings).unwrap_or_default(),
                manifest.model_id
            ),
        ));
    }
    crate::util::write_atomic(
        &manifest_path(out_dir),
        serde_json::to_string_pretty(manifest)
            .expect("serialisable")
            .as_bytes(),
    )
}

/// The results table a run writes: results.csv for the whole batch, results-shard-I-of-N.csv for a shard (shards
/// share the folder; `batch merge` gathers every case into results.csv).
pub fn results_path_for(out_dir: &Path, shard: crate::shard::Shard) -> PathBuf {
    if shard.is_all() {
        results_path(out_dir)
    } else {
        out_dir.join(format!("results-{}.csv", shard.file_stem()))
    }
}

/// What a case's folder records when all its jobs have ended: the proof of which inputs they ran on, and rows.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CaseRecord {
    /// [`case_inputs`] of the case as it was run.
    pub inputs: String,
    pub shard: crate::shard::Shard,
    pub host: String,
    pub rows: Vec<ResultRow>,
}

impl CaseFiles {
    /// The case's lock (see [`crate::lock`]).
    pub fn lock(&self) -> PathBuf {
        self.dir.join(".lock")
    }

    /// The case's [`CaseRecord`].
    pub fn record_of_case(&self) -> PathBuf {
        self.dir.join("case.json")
    }
}

/// The fingerprint of everything a case's results depend on: its row (prompt, the photo file's bytes, every edit),
/// the inversion settings, the model and the stylediff version.
pub fn case_inputs(
    case: &CsvCase,
    settings: &crate::InversionSettings,
    model_id: &str,
) -> Result<String> {
    let photo = crate::image_io::file_sha256(&case.image)?;
    Ok(fingerprint(&(
        &case.case,
        &case.prompt,
        photo,
        &case.edits,
        settings,
        model_id,
        env!("CARGO_PKG_VERSION"),
    )))
}

/// Runs `cases` (a shard's, from [`shard_cases`], or all): each case under its lock ([`crate::lock`]), its
/// inversion (skipped when the artifact on disk provably matches the model, the photo's pixels, the prompt and the
/// settings), then each edit (skipped when its record matches the inversion file, the edit settings and this
/// stylediff version), then the case's record. A failed job is recorded and the batch goes on; the run's table
/// (for `shard`) is rewritten after every case. A case whose lock another live process holds is left to the end,
/// then waited for (and, done by then, skipped). `photos` come from [`prepare`]. Cancelling stops at the next UNet
/// evaluation with [`Error::Cancelled`], the finished cases kept.
#[allow(clippy::too_many_arguments)]
pub fn run(
    editor: &crate::Editor,
    cases: &[CsvCase],
    photos: &[image::RgbImage],
    settings: &crate::InversionSettings,
    out_dir: &Path,
    shard: crate::shard::Shard,
    locks: &crate::lock::LockOptions,
    cancel: &crate::CancelToken,
    on_event: &mut (dyn FnMut(BatchEvent) + Send),
) -> Result<BatchSummary> {
    use crate::lock::Turn;
    let table = results_path_for(out_dir, shard);
    let mut rows: Vec<ResultRow> = Vec::new();
    let mut summary = BatchSummary {
        jobs: cases.iter().map(|c| 1 + c.edits.len()).sum(),
        ..Default::default()
    };
    let model_id = editor.model().model_id.clone();
    let indices: Vec<usize> = (0..cases.len()).collect();
    let result = crate::lock::for_each_locked(
        &indices,
        |&k| CaseFiles::new(out_dir, &cases[k]).lock(),
        locks,
        cancel,
        |&k, turn| {
            let case = &cases[k];
            let (lock, case_cancel) = match turn {
                Turn::Busy(holder) => {
                    on_event(BatchEvent::Busy {
                        case: &case.case,
                        holder,
                    });
                    return Ok(());
                }
                Turn::Held { lock, cancel } => (lock, cancel),
            };
            let files = CaseFiles::new(out_dir, case);
            let inputs = case_inputs(case, settings, &model_id)?;
            let case_rows = match run_case(
                editor,
                case,
                &photos[k],
                settings,
                &files,
                case_cancel,
                &mut summary,
                on_event,
            ) {
                Err(Error::Cancelled) if lock.lost() && !cancel.is_cancelled() => {
                    return Err(Error::file(
                        files.lock(),
                        "another process took this case's lock while it ran (it judged the lock stale: are the \
                         machines' clocks apart by more than the stale limit?); stopping",
                    ));
                }
                other => other?,
            };
            let record = CaseRecord {
                inputs,
                shard,
                host: crate::util::host_name(),
                rows: case_rows.clone(),
            };
            crate::util::write_atomic(
                &files.record_of_case(),
                serde_json::to_string_pretty(&record)
                    .expect("serialisable")
                    .as_bytes(),
            )?;
            rows.extend(case_rows);
            write_results(&table, &rows)
        },
    );
    write_results(&table, &rows)?;
    result.map(|()| summary)
}

/// One case's jobs (its lock held): its rows, each also reported as it ends.
#[allow(clippy::too_many_arguments)]
fn run_case(
    editor: &crate::Editor,
    case: &CsvCase,
    photo: &image::RgbImage,
    settings: &crate::InversionSettings,
    files: &CaseFiles,
    cancel: &crate::CancelToken,
    summary: &mut BatchSummary,
    on_event: &mut (dyn FnMut(BatchEvent) + Send),
) -> Result<Vec<ResultRow>> {
    use crate::invert::artifact;
    let method = settings.method.name();
    let mut rows: Vec<ResultRow> = Vec::new();
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
                .and_then(|inv| {
                    cancel.check()?;
                    artifact::save(&inv, &inv_path).map(|_| inv)
                });
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
                Err(Error::Cancelled) => return Err(Error::Cancelled),
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
                    return Ok(rows);
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
        let mut monitor =
            crate::Monitor::new(|p| on_event(BatchEvent::Progress(p))).with_cancel(cancel.clone());
        let result = editor.edit(&inv, edit, &mut monitor).and_then(|e| {
            cancel.check()?;
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
            Err(Error::Cancelled) => return Err(Error::Cancelled),
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
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------------------------
// Merge: every case of a CSV, gathered from the folder the shards share.

/// Where a case stands after the shards ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaseStatus {
    /// Every job done (or skipped as done before), its files present.
    Done,
    /// Some job failed (its row says why).
    Failed,
    /// No current record: not run yet, interrupted, run with other inputs, or a file of it is gone.
    Missing,
}

/// One case in the merge.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MergedCase {
    pub case: String,
    pub status: CaseStatus,
    /// The shard the partition gives it (for the manifest's shard count).
    pub shard: usize,
    /// The shard and machine that ran it, when one did.
    pub ran_on: Option<String>,
    /// Why it is missing or failed.
    pub detail: String,
}

/// Counts per shard.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ShardTally {
    pub shard: usize,
    pub cases: usize,
    pub done: usize,
    pub failed: usize,
    pub missing: usize,
    /// Expected cost in UNet evaluations (see [`case_cost`]).
    pub cost: f64,
}

/// The merge of a batch folder: what `summary.json` holds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MergeReport {
    pub shards: usize,
    pub done: usize,
    pub failed: usize,
    pub missing: usize,
    pub per_shard: Vec<ShardTally>,
    pub cases: Vec<MergedCase>,
    /// The command lines that would finish the failed and missing cases, one per shard that has any.
    pub finish: Vec<Vec<String>>,
}

impl MergeReport {
    pub fn complete(&self) -> bool {
        self.failed == 0 && self.missing == 0
    }
}

pub fn summary_path(out_dir: &Path) -> PathBuf {
    out_dir.join("summary.json")
}

/// Gathers every case of `cases` from `out_dir` into results.csv (the CSV's order; a missing case gets one row
/// saying so) and summary.json. A case counts as done only when its record proves it ran on its present inputs
/// (photo bytes, prompt, edits, the manifest's model and settings) and every file it lists is there. Reads no
/// model; runs nothing.
pub fn merge(cases: &[CsvCase], out_dir: &Path) -> Result<MergeReport> {
    let manifest = read_manifest(out_dir)?.ok_or_else(|| {
        Error::file(
            manifest_path(out_dir),
            "not found: no shard of a batch has started in this folder (it writes batch.json first)",
        )
    })?;
    let count = manifest.shards.max(1);
    let part = partition(cases, &manifest.settings, count);
    let mut per_shard: Vec<ShardTally> = (0..count)
        .map(|shard| ShardTally {
            shard,
            ..Default::default()
        })
        .collect();
    let mut merged = Vec::new();
    let mut rows = Vec::new();
    for (case, &shard) in cases.iter().zip(&part) {
        let files = CaseFiles::new(out_dir, case);
        let (status, ran_on, detail, case_rows) = judge_case(case, &files, &manifest);
        let tally = &mut per_shard[shard];
        tally.cases += 1;
        tally.cost += case_cost(case, &manifest.settings);
        match status {
            CaseStatus::Done => tally.done += 1,
            CaseStatus::Failed => tally.failed += 1,
            CaseStatus::Missing => tally.missing += 1,
        }
        if status == CaseStatus::Missing {
            rows.push(ResultRow {
                case: case.case.clone(),
                variant: String::new(),
                prompt: case.prompt.clone(),
                target: String::new(),
                method: manifest.settings.method.name().into(),
                recon_psnr: String::new(),
                status: format!("missing: {detail}"),
                output: String::new(),
            });
        } else {
            rows.extend(case_rows);
        }
        merged.push(MergedCase {
            case: case.case.clone(),
            status,
            shard,
            ran_on,
            detail,
        });
    }
    let finish = per_shard
        .iter()
        .filter(|t| t.failed + t.missing > 0)
        .map(|t| {
            let mut c = manifest.command.clone();
            if count > 1 {
                c.push("--shard".into());
                c.push(format!("{}/{count}", t.shard));
            }
            c
        })
        .collect();
    let report = MergeReport {
        shards: count,
        done: merged
            .iter()
            .filter(|c| c.status == CaseStatus::Done)
            .count(),
        failed: merged
            .iter()
            .filter(|c| c.status == CaseStatus::Failed)
            .count(),
        missing: merged
            .iter()
            .filter(|c| c.status == CaseStatus::Missing)
            .count(),
        per_shard,
        cases: merged,
        finish,
    };
    write_results(&results_path(out_dir), &rows)?;
    crate::util::write_atomic(
        &summary_path(out_dir),
        serde_json::to_string_pretty(&report)
            .expect("serialisable")
            .as_bytes(),
    )?;
    Ok(report)
}

fn judge_case(
    case: &CsvCase,
    files: &CaseFiles,
    manifest: &Manifest,
) -> (CaseStatus, Option<String>, String, Vec<ResultRow>) {
    let missing = |why: String| (CaseStatus::Missing, None, why, Vec::new());
    let record: CaseRecord = match std::fs::read(files.record_of_case()) {
        Err(_) => {
            let why = if files.lock().exists() {
                "not finished (its lock is there: running, or interrupted)"
            } else {
                "not run"
            };
            return missing(why.into());
        }
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => return missing(format!("unreadable case.json ({e})")),
        },
    };
    let expected = match case_inputs(case, &manifest.settings, &manifest.model_id) {
        Ok(f) => f,
        Err(e) => return missing(e.to_string()),
    };
    if record.inputs != expected {
        return missing(
            "its record is of other inputs (photo, prompt, edits, model or settings changed)"
                .into(),
        );
    }
    let ran_on = Some(format!("shard {} on {}", record.shard, record.host));
    let mut expected_jobs = vec!["inversion".to_string()];
    expected_jobs.extend(case.edits.iter().map(|(v, _)| v.clone()));
    let recorded: Vec<&str> = record.rows.iter().map(|r| r.variant.as_str()).collect();
    if record
        .rows
        .first()
        .is_some_and(|r| r.status.starts_with("failed"))
    {
        let why = record.rows[0].status.clone();
        return (CaseStatus::Failed, ran_on, why, record.rows);
    }
    if recorded != expected_jobs.iter().map(String::as_str).collect::<Vec<_>>() {
        return missing("its record lists other jobs".into());
    }
    if let Some(r) = record.rows.iter().find(|r| r.status.starts_with("failed")) {
        let why = format!("{}: {}", r.variant, r.status);
        return (CaseStatus::Failed, ran_on, why, record.rows);
    }
    let mut needed = vec![files.inversion()];
    for (variant, _) in &case.edits {
        needed.extend([
            files.edit(variant),
            files.grid(variant),
            files.record(variant),
        ]);
    }
    if let Some(gone) = needed.iter().find(|p| !p.is_file()) {
        return missing(format!("{} is gone", gone.display()));
    }
    (CaseStatus::Done, ran_on, String::new(), record.rows)
}
