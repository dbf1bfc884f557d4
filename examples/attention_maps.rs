//! Where each word of the prompt attends: `cargo run --example attention_maps [OUT.png]`.

use std::path::Path;

use stylediff::{Editor, InversionSettings, Method, Monitor};

fn run(out: &Path) -> stylediff::Result<()> {
    let editor = Editor::toy()?;
    let prompt = "a striped yellow triangle on a purple background";
    let photo = stylediff::toy::render_caption(prompt, 1)?;
    let mut settings = InversionSettings::new(Method::StyleDiffusion);
    (settings.steps, settings.inner_steps) = (10, 5);
    let inversion = editor.invert(&photo, prompt, &settings, &mut Monitor::silent())?;
    let maps = editor.attention_maps(&inversion, None, &mut Monitor::silent())?;
    for (k, label) in maps.labels.iter().enumerate() {
        let map = maps.token_map(k)?;
        let peak = map.flatten_all()?.argmax(0)?.to_scalar::<u32>()? as usize;
        println!(
            "{label:>12}: strongest at cell {:?}",
            (peak / maps.grid.1, peak % maps.grid.1)
        );
    }
    maps.sheet(96)?
        .save(out)
        .map_err(|e| stylediff::Error::file(out, e.to_string()))?;
    println!("wrote {}", out.display());
    Ok(())
}

fn main() -> stylediff::Result<()> {
    run(Path::new(
        &std::env::args().nth(1).unwrap_or_else(|| "maps.png".into()),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn example_runs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("maps.png");
        super::run(&out).unwrap();
        assert!(image::open(&out).unwrap().width() > 96);
    }
}
