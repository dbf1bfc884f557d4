//! Text-to-image: `cargo run --example generate [OUT.png]`.

use std::path::Path;

use stylediff::{Editor, GenerateOptions, Monitor};

fn run(out: &Path) -> stylediff::Result<()> {
    let editor = Editor::toy()?;
    let mut opts = GenerateOptions::new("a green square on a yellow background");
    (opts.steps, opts.guidance, opts.seed) = (20, 3.0, 7);
    let image = editor.generate(&opts, &mut Monitor::silent())?;
    let record = stylediff::outputs::generate_record(&opts, editor.model_id());
    stylediff::util::save_image_with_settings(
        out,
        &stylediff::util::tensor_to_image(&image.image)?,
        &record,
    )?;
    println!("wrote {}", out.display());
    Ok(())
}

fn main() -> stylediff::Result<()> {
    run(Path::new(
        &std::env::args()
            .nth(1)
            .unwrap_or_else(|| "generated.png".into()),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn example_runs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("g.png");
        super::run(&out).unwrap();
        let settings = stylediff::util::read_image_settings(&out).unwrap().unwrap();
        assert_eq!(settings["seed"], 7);
    }
}
