use std::path::PathBuf;

use stylediff::toy::bench::{
    BenchMethod, BenchOptions, BenchRow, results_csv, run_case, summary_markdown,
};
use stylediff::toy::pairs::{random_pairs, render_pair};
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

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let chosen = a.methods.clone().unwrap_or(BenchMethod::ALL.to_vec());
    let methods: Vec<String> = chosen.iter().map(|m| m.name().to_string()).collect();
    use stylediff::limits::{MAX_INNER_STEPS, count_in, fraction};
    count_in("cases", a.cases, 1, 100_000)?;
    count_in("steps", a.steps, 1, 1000)?;
    count_in("inner steps", a.inner_steps, 0, MAX_INNER_STEPS)?;
    fraction("tau_v", a.tau_v)?;
    let folder = a.model.folder()?;
    let mut plan = stylediff::outputs::OutputPlan::new();
    plan.input_folder("model folder", &folder)?;
    for name in ["results.csv", "summary.md", "gallery.png"] {
        plan.output(name, &a.out_dir.join(name))?;
    }
    plan.check_writable()?;
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
    let cases = random_pairs(a.cases, a.seed);
    let bar = progress_bar(cases.len() as u64, "cases");
    let mut rows: Vec<BenchRow> = Vec::new();
    let mut gallery: Vec<Vec<f32>> = Vec::new();
    for case in &cases {
        let saved = case_dir.join(format!("{:05}.json", case.case));
        let done = std::fs::read(&saved)
            .ok()
            .and_then(|b| serde_json::from_slice::<FinishedCase>(&b).ok())
            .filter(|f| f.fingerprint == fingerprint);
        let (case_rows, images) = match done {
            Some(f) => (f.rows, f.images),
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
                write_atomic(&saved, &serde_json::to_vec(&keep)?)?;
                (keep.rows, keep.images)
            }
        };
        if case.case < GALLERY_CASES {
            let r = render_pair(&case.pair, case.layout_seed);
            gallery.push(r.source);
            gallery.push(r.target);
            gallery.extend(images);
        }
        rows.extend(case_rows);
        write_atomic(&a.out_dir.join("results.csv"), &results_csv(&rows)?)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
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
