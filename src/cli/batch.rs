//! `batch`: the authors' CSVs, on one machine or as shards of a cluster job (`batch plan`, `batch merge`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use stylediff::batch::{self, BatchEvent, CaseStatus};
use stylediff::invert::{InversionSettings, Method};
use stylediff::outputs::OutputPlan;
use stylediff::shard::{self, Shard, ShardSource};

use super::invert::{load_editor, model_inputs};
use super::{ModelArgs, PhaseBar};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BatchArgs {
    #[command(subcommand)]
    command: Option<BatchCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Subcommand)]
enum BatchCommand {
    /// Print how a CSV splits into N shards: each shard's cases, jobs and expected cost.
    Plan(PlanArgs),
    /// Gather every case of the shards' shared folder into results.csv and summary.json; exits non-zero when a
    /// case is missing or failed, and prints the commands that would finish them.
    Merge(MergeArgs),
}

/// The inversion settings every shard of a batch shares (they decide what each case computes and costs).
#[derive(clap::Args)]
struct SettingsArgs {
    /// Inversion method.
    #[arg(long, value_enum, default_value_t = Method::StyleDiffusion)]
    method: Method,
    /// DDIM steps (the authors tuned their CSVs' taus at 30 steps on SD v1.4).
    #[arg(long, default_value_t = stylediff::batch::AUTHORS_STEPS)]
    steps: usize,
    /// Inner optimisation iterations K (as for `invert`).
    #[arg(long)]
    inner_steps: Option<usize>,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5, allow_negative_numbers = true)]
    guidance: f64,
}

impl SettingsArgs {
    fn settings(&self) -> anyhow::Result<InversionSettings> {
        let mut settings = InversionSettings::new(self.method);
        settings.steps = self.steps;
        if let Some(k) = self.inner_steps {
            settings.inner_steps = k;
        }
        settings.guidance = self.guidance;
        settings.validate()?;
        Ok(settings)
    }

    fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--method".to_string(),
            self.method.name().to_string(),
            "--steps".into(),
            self.steps.to_string(),
        ];
        if let Some(k) = self.inner_steps {
            args.extend(["--inner-steps".into(), k.to_string()]);
        }
        args.extend(["--guidance".into(), self.guidance.to_string()]);
        args
    }
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An authors' CSV (stylediffusion_editing*.csv to invert and edit, stylediffusion_prompts*.csv to invert).
    // An Option only because clap reads these arguments even under `batch plan` / `batch merge`.
    #[arg(long, value_name = "FILE.csv", required = true)]
    csv: Option<PathBuf>,
    /// Where each case's artifact and edits go, with the run's table (rewritten after every case). Shards of one
    /// batch share this folder.
    #[arg(long, value_name = "DIR", default_value = "stylediff-batch")]
    out_dir: PathBuf,
    #[command(flatten)]
    settings: SettingsArgs,
    /// CLIP image encoder (folder or hub id) when the model has no image_encoder/ (StyleDiffusion only).
    #[arg(long, value_name = "DIR|ORG/NAME")]
    image_encoder: Option<PathBuf>,
    /// Run only shard I of N (I counted from 0). Without it, a Slurm array task (SLURM_ARRAY_TASK_ID) or a
    /// Kubernetes Indexed Job pod (JOB_COMPLETION_INDEX, with --shards or STYLEDIFF_SHARDS) runs its own shard.
    #[arg(long, value_name = "I/N", value_parser = parse_shard)]
    shard: Option<Shard>,
    /// The number of shards, for a Kubernetes Indexed Job (its completions); with a Slurm array it makes the task
    /// id the shard number, so --array=1,4 reruns shards 1 and 4 of N.
    #[arg(long, value_name = "N", env = shard::SHARDS_ENV)]
    shards: Option<usize>,
    /// A case lock whose holder has not been heard from for this long is taken over (its holder is presumed
    /// dead: a node that crashed). A holder on this machine that is gone is noticed at once.
    #[arg(long, value_name = "SECONDS", default_value_t = 180)]
    lock_stale_after: u64,
}

pub(super) fn parse_shard(text: &str) -> Result<Shard, String> {
    Shard::parse(text).map_err(|e| e.to_string())
}

#[derive(clap::Args)]
struct PlanArgs {
    #[arg(long, value_name = "FILE.csv")]
    csv: PathBuf,
    /// The number of shards (array tasks, Indexed Job completions).
    #[arg(long, value_name = "N")]
    shards: usize,
    #[command(flatten)]
    settings: SettingsArgs,
}

#[derive(clap::Args)]
struct MergeArgs {
    /// The folder the shards share.
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
    /// The CSV the shards ran.
    #[arg(long, value_name = "FILE.csv")]
    csv: PathBuf,
}

pub fn run(a: BatchArgs) -> anyhow::Result<()> {
    match a.command {
        Some(BatchCommand::Plan(p)) => plan(p),
        Some(BatchCommand::Merge(m)) => merge(m),
        None => run_shard(a.run),
    }
}

fn plan(a: PlanArgs) -> anyhow::Result<()> {
    let settings = a.settings.settings()?;
    Shard::new(0, a.shards)?;
    let cases = batch::read_csv(&a.csv)?;
    let part = batch::partition(&cases, &settings, a.shards);
    let items = batch::shard_items(&cases, &settings);
    let loads = shard::loads(&items, &part, a.shards);
    let total: f64 = loads.iter().map(|l| l.cost).fold(0.0, |a, b| a + b);
    println!(
        "{}: {} cases, {} jobs, {:.0} UNet evaluations in all ({} {} steps, K {}), {} shards",
        a.csv.display(),
        cases.len(),
        cases.iter().map(|c| 1 + c.edits.len()).sum::<usize>(),
        total,
        settings.method.name(),
        settings.steps,
        settings.inner_steps,
        a.shards
    );
    println!(
        "{:>6} {:>6} {:>6} {:>12} {:>7}  cases",
        "shard", "cases", "jobs", "cost", "share"
    );
    for l in &loads {
        let mine: Vec<&batch::CsvCase> = cases
            .iter()
            .zip(&part)
            .filter(|(_, s)| **s == l.shard)
            .map(|(c, _)| c)
            .collect();
        let jobs: usize = mine.iter().map(|c| 1 + c.edits.len()).sum();
        let names: Vec<&str> = mine.iter().take(12).map(|c| c.case.as_str()).collect();
        let more = if mine.len() > 12 {
            format!(" (+{} more)", mine.len() - 12)
        } else {
            String::new()
        };
        println!(
            "{:>6} {:>6} {:>6} {:>12.0} {:>6.1}%  {}{more}",
            format!("{}/{}", l.shard, a.shards),
            l.items,
            jobs,
            l.cost,
            if total > 0.0 {
                100.0 * l.cost / total
            } else {
                0.0
            },
            names.join(" ")
        );
    }
    let biggest = loads.iter().map(|l| l.cost).fold(0.0, f64::max);
    if total > 0.0 {
        println!(
            "the largest shard is {:.2}x the mean; cost counts UNet evaluations (a backward pass as two), see docs/scale-out.md",
            biggest / (total / a.shards as f64)
        );
    }
    let missing: Vec<String> = cases
        .iter()
        .filter(|c| !c.image.is_file())
        .map(|c| format!("case {}: {} not found", c.case, c.image.display()))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "{} photo(s) not found:\n  - {}",
            missing.len(),
            missing.join("\n  - ")
        );
    }
    Ok(())
}

fn merge(a: MergeArgs) -> anyhow::Result<()> {
    // The tables merge writes are checked like every other output: never onto the CSV it reads.
    let mut plan = OutputPlan::new();
    plan.input("CSV (--csv)", &a.csv)?;
    plan.output("results table", &batch::results_path(&a.out_dir))?;
    plan.output("merge summary", &batch::summary_path(&a.out_dir))?;
    plan.check_writable()?;
    let cases = batch::read_csv(&a.csv)?;
    let report = batch::merge(&cases, &a.out_dir)?;
    println!(
        "{:>6} {:>6} {:>6} {:>7} {:>8}",
        "shard", "cases", "done", "failed", "missing"
    );
    for t in &report.per_shard {
        println!(
            "{:>6} {:>6} {:>6} {:>7} {:>8}",
            format!("{}/{}", t.shard, report.shards),
            t.cases,
            t.done,
            t.failed,
            t.missing
        );
    }
    for c in report.cases.iter().filter(|c| c.status != CaseStatus::Done) {
        let status = if c.status == CaseStatus::Failed {
            "failed"
        } else {
            "missing"
        };
        println!(
            "case {} (shard {}/{}): {status}: {}",
            c.case, c.shard, report.shards, c.detail
        );
    }
    println!(
        "{} cases: {} done, {} failed, {} missing; {} and {}",
        report.cases.len(),
        report.done,
        report.failed,
        report.missing,
        batch::results_path(&a.out_dir).display(),
        batch::summary_path(&a.out_dir).display()
    );
    if !report.complete() {
        println!("to finish (finished cases are skipped):");
        for command in &report.finish {
            println!("  {}", shell_words(command));
        }
        anyhow::bail!(
            "{} case(s) missing and {} failed",
            report.missing,
            report.failed
        );
    }
    Ok(())
}

/// A command line as a shell would read it back (words with spaces or quotes single-quoted).
pub(super) fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+".contains(c))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn run_shard(a: RunArgs) -> anyhow::Result<()> {
    let csv = a.csv.clone().context("--csv is required")?;
    let settings = a.settings.settings()?;
    let all_cases = batch::read_csv(&csv)?;
    let env = |k: &str| std::env::var(k).ok();
    let (shard, source) = shard::resolve(a.shard, a.shards, &env)?;
    let cases = batch::shard_cases(&all_cases, &settings, shard);
    let cost = |cs: &[batch::CsvCase]| -> f64 {
        cs.iter()
            .map(|c| batch::case_cost(c, &settings))
            .fold(0.0, |a, b| a + b)
    };
    if !shard.is_all() {
        eprintln!(
            "shard {shard} ({source}): {} of {} cases, {:.0} of {:.0} UNet evaluations",
            cases.len(),
            all_cases.len(),
            cost(&cases),
            cost(&all_cases)
        );
    }
    if a.settings.steps != batch::AUTHORS_STEPS && cases.iter().any(|c| !c.edits.is_empty()) {
        eprintln!(
            "warning: --steps {}: the authors tuned these CSVs' taus at {} DDIM steps on Stable Diffusion v1.4; \
             the tau fractions mean other step counts at other step counts",
            a.settings.steps,
            batch::AUTHORS_STEPS
        );
    }
    // Every path of this shard's cases is planned and checked before any work.
    let mut plan = OutputPlan::new();
    plan.input("CSV (--csv)", &csv)?;
    let (folder, encoder) = model_inputs(&mut plan, &a.model, a.image_encoder.as_ref())?;
    batch::plan_outputs(&mut plan, &cases, &a.out_dir, shard)?;
    plan.check_writable()?;
    if a.model.is_toy() {
        for case in &cases {
            if let Ok(rgb) = stylediff::image_io::load_rgb(&case.image) {
                super::warn_if_not_toy(&a.model, &case.image, &rgb);
            }
        }
    }
    let editor = load_editor(&folder, &a.model, Some(settings.method), encoder)?;
    let photos = batch::prepare(&editor, &cases, &settings).map_err(|problems| {
        anyhow::anyhow!(
            "{}: {} problem(s), nothing was run:\n  - {}",
            csv.display(),
            problems.len(),
            problems.join("\n  - ")
        )
    })?;
    let mut command = vec![
        "stylediff".to_string(),
        "batch".into(),
        "--csv".into(),
        csv.display().to_string(),
        "--out-dir".into(),
        a.out_dir.display().to_string(),
    ];
    command.extend(a.model.to_args());
    command.extend(a.settings.to_args());
    if let Some(enc) = &a.image_encoder {
        command.extend(["--image-encoder".into(), enc.display().to_string()]);
    }
    batch::write_manifest(
        &a.out_dir,
        &batch::Manifest {
            stylediff_version: env!("CARGO_PKG_VERSION").into(),
            model_id: editor.model().model_id.clone(),
            settings: settings.clone(),
            csv: csv.display().to_string(),
            csv_sha256: stylediff::image_io::file_sha256(&csv)?,
            shards: shard.count,
            command,
        },
        !shard.is_all(),
    )?;
    let owner = match &source {
        ShardSource::Whole => "stylediff batch".to_string(),
        s => format!("shard {shard} ({s})"),
    };
    let locks = stylediff::lock::LockOptions {
        owner,
        stale_after: Duration::from_secs(a.lock_stale_after.max(1)),
        ..Default::default()
    };
    let cancel = stylediff::CancelToken::new();
    super::cancel_on_signal(&cancel);
    let jobs: usize = cases.iter().map(|c| 1 + c.edits.len()).sum();
    let overall = super::progress_bar(jobs as u64, "batch");
    let mut view: Option<PhaseBar> = None;
    let budget: Vec<usize> = (0..settings.steps).map(|i| settings.inner_at(i)).collect();
    let result = batch::run(
        &editor,
        &cases,
        &photos,
        &settings,
        &a.out_dir,
        shard,
        &locks,
        &cancel,
        &mut |event| match event {
            BatchEvent::Started { case, job } => {
                overall.suspend(|| eprintln!("case {case} {job}: started"));
                let budget = if job == "inversion" {
                    budget.clone()
                } else {
                    Vec::new()
                };
                view = Some(PhaseBar::new(budget));
            }
            BatchEvent::Progress(p) => {
                if let Some(v) = &mut view {
                    v.update(p)
                }
            }
            BatchEvent::Finished { row } => {
                if let Some(v) = view.take() {
                    v.finish();
                }
                let psnr = if row.recon_psnr.is_empty() || row.variant != "inversion" {
                    String::new()
                } else {
                    format!(" (reconstruction PSNR {} dB)", row.recon_psnr)
                };
                overall.suspend(|| {
                    eprintln!("case {} {}: {}{psnr}", row.case, row.variant, row.status)
                });
                overall.inc(
                    if row.status.starts_with("failed") && row.variant == "inversion" {
                        (1 + cases
                            .iter()
                            .find(|c| c.case == row.case)
                            .map_or(0, |c| c.edits.len())) as u64
                    } else {
                        1
                    },
                );
            }
            BatchEvent::Busy { case, holder } => overall.suspend(|| {
                eprintln!("case {case}: being run by {holder}; left to the end, then waited for")
            }),
        },
    );
    overall.finish_and_clear();
    let table = batch::results_path_for(&a.out_dir, shard);
    let summary = match result {
        Err(stylediff::Error::Cancelled) => anyhow::bail!(
            "stopped by a signal; finished cases are kept (see {}); run the same command to resume",
            table.display()
        ),
        other => other?,
    };
    eprintln!(
        "batch{}: {} done, {} skipped, {} failed (skipped: done before with the same inputs); table in {}",
        if shard.is_all() {
            String::new()
        } else {
            format!(" shard {shard}")
        },
        summary.done,
        summary.skipped,
        summary.failed,
        table.display()
    );
    if summary.failed > 0 {
        anyhow::bail!(
            "{} of {} jobs failed (see {})",
            summary.failed,
            summary.jobs,
            table.display()
        );
    }
    Ok(())
}
