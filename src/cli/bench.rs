use std::path::PathBuf;

use stylediff::lock::Turn;
use stylediff::shard::{self, Shard};
use stylediff::toy::bench::{
    BenchMethod, BenchOptions, BenchRow, results_csv, run_case, summary_markdown,
};
use stylediff::toy::pairs::{PairCase, random_pairs, render_pair};
use stylediff::toy::train::TOY_SIZE;
use stylediff::util::{save_png, write_atomic};
use stylediff::viz::image_grid;

use super::{ModelArgs, progress_bar};

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Edit pairs drawn from the toy world (held-out layouts; all edit kinds; one- and two-object scenes).
    #[arg(long, default_value_t = 20)]
    cases: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Comma-separated subset of: ddim, null-text, negative-prompt, stylediffusion-p2p, stylediffusion-p2plus,
    /// stylediffusion-noreg.
    #[arg(long, value_delimiter = ',', value_enum)]
    methods: Option<Vec<BenchMethod>>,
    /// DDIM steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// StyleDiffusion's K (inner iterations at step 0).
    #[arg(long, default_value_t = 40)]
    inner_steps: usize,
    /// StyleDiffusion's tau_v: the fraction of steps in which the edit uses the learned value embedding (the
    /// paper's .5; docs/benchmark.md compares .5 and 0 on the bundled toy model).
    #[arg(long, default_value_t = 0.5)]
    tau_v: f64,
    /// results.csv, summary.md and gallery.png go here. Cases already finished with the same settings (kept under
    /// DIR/.cases/) are not run again, so an interrupted run resumes.
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
    /// Run only shard I of N of the cases (I counted from 0), into the shared --out-dir; then `--merge` writes the
    /// tables. Without it a Slurm array task or Kubernetes Indexed Job pod runs its own shard, as `batch` does.
    #[arg(long, value_name = "I/N", value_parser = super::batch::parse_shard)]
    shard: Option<Shard>,
    /// The number of shards, for a Kubernetes Indexed Job (its completions).
    #[arg(long, value_name = "N", env = shard::SHARDS_ENV)]
    shards: Option<usize>,
    /// Run nothing: gather the shards' finished cases into results.csv, summary.md and gallery.png; exits non-zero
    /// (printing the commands that finish them) when cases are missing.
    #[arg(long)]
    merge: bool,
    /// A case lock whose holder has not been heard from for this long is taken over.
    #[arg(long, value_name = "SECONDS", default_value_t = 180)]
    lock_stale_after: u64,
}

/// The first cases, shown in gallery.png.
const GALLERY_CASES: usize = 6;

/// A case's rows (and, for the gallery's cases, its edited images) as kept for resuming.
#[derive(serde::Serialize, serde::Deserialize)]
struct FinishedCase {
    fingerprint: String,
    rows: Vec<BenchRow>,
    images: Vec<Vec<f32>>,
}

/// Which of the bench's cases a shard runs: each case counts the same (every case runs every method).
fn shard_of_cases(cases: &[PairCase], count: usize) -> Vec<usize> {
    let items: Vec<shard::Item> = cases
        .iter()
        .map(|c| shard::Item {
            id: format!("case-{}", c.case),
            cost: 1.0,
        })
        .collect();
    shard::partition(&items, count)
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let chosen = a.methods.clone().unwrap_or(BenchMethod::ALL.to_vec());
    let methods: Vec<String> = chosen.iter().map(|m| m.name().to_string()).collect();
    use stylediff::limits::{MAX_INNER_STEPS, count_in, fraction};
    count_in("cases", a.cases, 1, 100_000)?;
    count_in("steps", a.steps, 1, 1000)?;
    count_in("inner steps", a.inner_steps, 0, MAX_INNER_STEPS)?;
    fraction("tau_v", a.tau_v)?;
    // A merge runs nothing: --shards only says how the missing cases split, for the commands that finish them.
    let (shard, source) = if a.merge {
        if a.shard.is_some() {
            anyhow::bail!("--merge gathers every shard's cases: give it --shards N, not --shard");
        }
        (
            Shard::new(0, a.shards.unwrap_or(1))?,
            shard::ShardSource::Whole,
        )
    } else {
        let env = |k: &str| std::env::var(k).ok();
        shard::resolve(a.shard, a.shards, &env)?
    };
    let folder = a.model.folder()?;
    let mut plan = stylediff::outputs::OutputPlan::new();
    plan.input_folder("model folder", &folder)?;
    let tables: Vec<String> = if shard.is_all() || a.merge {
        vec![
            "results.csv".into(),
            "summary.md".into(),
            "gallery.png".into(),
        ]
    } else {
        vec![format!("results-{}.csv", shard.file_stem())]
    };
    for name in &tables {
        plan.output(name, &a.out_dir.join(name))?;
    }
    plan.check_writable()?;
    // Everything a finished case depends on besides its index: a case computed under other settings is redone.
    let fingerprint = format!(
        "model {} seed {} steps {} inner {} tau_v {} methods {}",
        stylediff::model::model_identity(&folder)?,
        a.seed,
        a.steps,
        a.inner_steps,
        a.tau_v,
        methods.join(",")
    );
    let case_dir = a.out_dir.join(".cases");
    std::fs::create_dir_all(&case_dir)?;
    let saved = |case: &PairCase| case_dir.join(format!("{:05}.json", case.case));
    let finished = |case: &PairCase| {
        std::fs::read(saved(case))
            .ok()
            .and_then(|b| serde_json::from_slice::<FinishedCase>(&b).ok())
            .filter(|f| f.fingerprint == fingerprint)
    };
    let cases = random_pairs(a.cases, a.seed);
    let part = shard_of_cases(&cases, shard.count);
    let mine: Vec<&PairCase> = cases
        .iter()
        .zip(&part)
        .filter(|(_, s)| **s == shard.index)
        .map(|(c, _)| c)
        .collect();
    if !a.merge {
        if !shard.is_all() {
            eprintln!(
                "shard {shard} ({source}): {} of {} cases",
                mine.len(),
                cases.len()
            );
        }
        let mut opts = a.model.load_options()?;
        opts.image_encoder = true;
        let sd = stylediff::model::StableDiffusion::load(&folder, &opts)?;
        if sd.native_size() != TOY_SIZE {
            anyhow::bail!(
                "the benchmark runs on toy-world models ({TOY_SIZE}x{TOY_SIZE}); this model makes {0}x{0}",
                sd.native_size()
            );
        }
        let bench = BenchOptions {
            steps: a.steps,
            inner_steps: a.inner_steps,
            tau_v: a.tau_v,
            methods: chosen,
        };
        let cancel = stylediff::CancelToken::new();
        super::cancel_on_signal(&cancel);
        let locks = stylediff::lock::LockOptions {
            owner: format!("bench shard {shard} ({source})"),
            stale_after: std::time::Duration::from_secs(a.lock_stale_after.max(1)),
            ..Default::default()
        };
        let bar = progress_bar(mine.len() as u64, "cases");
        let mut rows: Vec<BenchRow> = Vec::new();
        let result = stylediff::lock::for_each_locked(
            &mine,
            |case| case_dir.join(format!("{:05}.lock", case.case)),
            &locks,
            &cancel,
            |case, turn| {
                if let Turn::Busy(holder) = turn {
                    bar.suspend(|| eprintln!("case {}: being run by {holder}; waiting", case.case));
                    return Ok(());
                }
                let case_rows = match finished(case) {
                    Some(f) => f.rows,
                    None => {
                        let (case_rows, images) = run_case(&sd, case, &bench)?;
                        let keep = FinishedCase {
                            fingerprint: fingerprint.clone(),
                            rows: case_rows,
                            images: if case.case < GALLERY_CASES {
                                images
                            } else {
                                Vec::new()
                            },
                        };
                        let json = serde_json::to_vec(&keep).expect("serialisable");
                        write_atomic(&saved(case), &json)?;
                        keep.rows
                    }
                };
                rows.extend(case_rows);
                if !shard.is_all() {
                    write_atomic(&a.out_dir.join(&tables[0]), &results_csv(&rows)?)?;
                }
                bar.inc(1);
                Ok(())
            },
        );
        bar.finish_and_clear();
        match result {
            Err(stylediff::Error::Cancelled) => anyhow::bail!(
                "stopped by a signal; finished cases are kept under {}; run the same command to resume",
                case_dir.display()
            ),
            other => other?,
        }
        if !shard.is_all() {
            eprintln!(
                "shard {shard}: {} cases done; when every shard has finished, `stylediff bench --merge` with the same \
                 options writes the tables",
                mine.len()
            );
            return Ok(());
        }
    }
    // Gather every case (all shards' when merging) into the tables.
    let mut rows: Vec<BenchRow> = Vec::new();
    let mut gallery: Vec<Vec<f32>> = Vec::new();
    let mut missing: Vec<(usize, usize)> = Vec::new();
    for (case, &s) in cases.iter().zip(&part) {
        let Some(f) = finished(case) else {
            missing.push((case.case, s));
            continue;
        };
        if case.case < GALLERY_CASES {
            let r = render_pair(&case.pair, case.layout_seed);
            gallery.push(r.source);
            gallery.push(r.target);
            gallery.extend(f.images);
        }
        rows.extend(f.rows);
    }
    if !missing.is_empty() {
        eprintln!(
            "{} of {} cases are not finished with these options: {}",
            missing.len(),
            cases.len(),
            missing
                .iter()
                .map(|m| m.0.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut command: Vec<String> = vec!["stylediff".into(), "bench".into()];
        command.extend(a.model.to_args());
        command.extend([
            "--cases".into(),
            a.cases.to_string(),
            "--seed".into(),
            a.seed.to_string(),
            "--methods".into(),
            methods.join(","),
            "--steps".into(),
            a.steps.to_string(),
            "--inner-steps".into(),
            a.inner_steps.to_string(),
            "--tau-v".into(),
            a.tau_v.to_string(),
            "--out-dir".into(),
            a.out_dir.display().to_string(),
        ]);
        let mut shards: Vec<usize> = missing.iter().map(|m| m.1).collect();
        shards.sort_unstable();
        shards.dedup();
        eprintln!("to finish them (finished cases are skipped), then merge again:");
        for s in shards {
            let mut c = command.clone();
            if shard.count > 1 {
                c.extend(["--shard".into(), format!("{s}/{}", shard.count)]);
            }
            eprintln!("  {}", super::batch::shell_words(&c));
        }
        anyhow::bail!("{} case(s) missing", missing.len());
    }
    write_atomic(&a.out_dir.join("results.csv"), &results_csv(&rows)?)?;
    let mut md = format!(
        "# Toy editing benchmark\n\n`stylediff bench --cases {} --seed {} --steps {} --inner-steps {} --tau-v {}` — mean ± 95% interval per method.\n\n",
        a.cases, a.seed, a.steps, a.inner_steps, a.tau_v
    );
    md.push_str(&summary_markdown(&rows, &methods));
    md.push_str(&format!(
        "\nGallery rows: input | ground truth | {}.\n",
        methods.join(" | ")
    ));
    write_atomic(&a.out_dir.join("summary.md"), md.as_bytes())?;
    save_png(
        &a.out_dir.join("gallery.png"),
        &image_grid(&gallery, TOY_SIZE, 2 + methods.len(), 3),
    )?;
    println!("{md}");
    Ok(())
}
