use std::path::PathBuf;

use stylediff::toy::bench::{
    BenchOptions, BenchRow, CSV_HEADER, METHODS, run_case, summary_markdown,
};
use stylediff::toy::eval::image_grid;
use stylediff::toy::pairs::{random_pairs, render_pair};
use stylediff::toy::train::TOY_SIZE;
use stylediff::util::{save_png, write_atomic};

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
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<String>>,
    /// DDIM steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// StyleDiffusion's K (inner iterations at step 0).
    #[arg(long, default_value_t = 40)]
    inner_steps: usize,
    /// results.csv, summary.md and gallery.png go here.
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let methods = a
        .methods
        .clone()
        .unwrap_or_else(|| METHODS.iter().map(|m| m.to_string()).collect());
    let mut opts = a.model.load_options()?;
    opts.image_encoder = true;
    let sd = stylediff::model::StableDiffusion::load(&a.model.folder()?, &opts)?;
    if sd.native_size() != TOY_SIZE {
        anyhow::bail!(
            "the benchmark runs on toy-world models ({TOY_SIZE}x{TOY_SIZE}); this model makes {0}x{0}",
            sd.native_size()
        );
    }
    let bench = BenchOptions {
        steps: a.steps,
        inner_steps: a.inner_steps,
        methods: methods.clone(),
    };
    let cases = random_pairs(a.cases, a.seed);
    let bar = progress_bar(cases.len() as u64, "cases");
    let mut rows: Vec<BenchRow> = Vec::new();
    let mut gallery: Vec<Vec<f32>> = Vec::new();
    for case in &cases {
        let (case_rows, images) = run_case(&sd, case, &bench)?;
        if case.case < 6 {
            let r = render_pair(&case.pair, case.layout_seed);
            gallery.push(r.source);
            gallery.push(r.target);
            gallery.extend(images);
        }
        rows.extend(case_rows);
        let csv: String = std::iter::once(CSV_HEADER.to_string())
            .chain(rows.iter().map(BenchRow::csv))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        write_atomic(&a.out_dir.join("results.csv"), csv.as_bytes())?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut md = format!(
        "# Toy editing benchmark\n\n`stylediff bench --cases {} --seed {} --steps {} --inner-steps {}` — mean ± 95% interval per method.\n\n",
        a.cases, a.seed, a.steps, a.inner_steps
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
