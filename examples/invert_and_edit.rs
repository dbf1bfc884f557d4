//! Invert a photo once, then edit it twice: `cargo run --example invert_and_edit [OUT_DIR]`.
//! Runs on the bundled toy model (a 32x32 toy scene); load your own model with `Editor::load` for photos.

use std::path::Path;

use stylediff::{CancelToken, EditSettings, Editor, InversionSettings, Method, Monitor};

fn run(out: &Path) -> stylediff::Result<()> {
    let editor = Editor::toy()?;
    let photo = stylediff::toy::render_caption("a red circle on a blue background", 3)?;

    let mut settings = InversionSettings::new(Method::StyleDiffusion);
    (settings.steps, settings.inner_steps) = (10, 10);
    // Progress of every step and inner iteration; cancelling the token (from any thread) stops the job.
    let cancel = CancelToken::new();
    let mut monitor = Monitor::new(|p| {
        if p.inner <= 1 {
            eprintln!("{:>14} {}/{}", p.phase.label(), p.step, p.steps)
        }
    })
    .with_cancel(cancel.clone());
    let prompt = "a red circle on a blue background";
    let inversion = editor.invert(&photo, prompt, &settings, &mut monitor)?;
    drop(monitor);
    println!("reconstruction PSNR {:.1} dB", inversion.recon_psnr);

    for (name, target) in [
        ("green", "a green circle on a blue background"),
        ("square", "a red square on a blue background"),
    ] {
        let edit = EditSettings::new(target);
        let result = editor.edit(&inversion, &edit, &mut Monitor::silent())?;
        let path = out.join(format!("{name}.png"));
        let record = stylediff::outputs::edit_record(&inversion, &edit);
        stylediff::util::save_image_with_settings(&path, &result.edited_image()?, &record)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn main() -> stylediff::Result<()> {
    run(Path::new(
        &std::env::args().nth(1).unwrap_or_else(|| ".".into()),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn example_runs() {
        let dir = tempfile::tempdir().unwrap();
        super::run(dir.path()).unwrap();
        for name in ["green.png", "square.png"] {
            let settings = stylediff::util::read_image_settings(&dir.path().join(name)).unwrap();
            assert_eq!(
                settings.unwrap()["kind"],
                "edit",
                "{name} records its settings"
            );
        }
    }
}
