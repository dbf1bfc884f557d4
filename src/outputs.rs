//! Where results may be written, decided before any work: every output differs from every input and from every
//! other output (compared as canonical paths, so `./a.png`, `a.png` and a symlink to it are one file), its folder
//! exists or can be created and is writable, and an image output's extension names a format stylediff writes.

use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// What an edited image records about how it was made: both prompts, every edit setting, the inversion's method
/// and settings, the model and the photo it came from, and the stylediff version.
pub fn edit_record(
    inv: &crate::invert::Inversion,
    edit: &crate::edit::EditSettings,
) -> serde_json::Value {
    serde_json::json!({
        "kind": "edit",
        "source_prompt": inv.source_prompt,
        "target_prompt": edit.target,
        "edit": edit,
        "inversion": inv.settings,
        "model_id": inv.model_id,
        "image_sha256": inv.image_sha256,
        "stylediff_version": env!("CARGO_PKG_VERSION"),
    })
}

/// What a generated image records: prompts, steps, guidance, seed, size, model and version.
pub fn generate_record(
    opts: &crate::pipeline::GenerateOptions,
    model_id: &str,
) -> serde_json::Value {
    serde_json::json!({
        "kind": "generate",
        "prompt": opts.prompt,
        "negative_prompt": opts.negative_prompt,
        "steps": opts.steps,
        "guidance": opts.guidance,
        "seed": if opts.latents.is_some() { None } else { Some(opts.seed) },
        "initial_latent": if opts.latents.is_some() { "given" } else { "from the seed" },
        "width": opts.width,
        "height": opts.height,
        "model_id": model_id,
        "stylediff_version": env!("CARGO_PKG_VERSION"),
    })
}

/// Image formats an output's extension may name.
pub const IMAGE_EXTENSIONS: &str = ".png, .jpg, .jpeg or .webp";

/// The image format an output path asks for by its extension; anything else is refused.
pub fn image_format(path: &Path) -> Result<image::ImageFormat> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") => Ok(image::ImageFormat::Png),
        Some("jpg") | Some("jpeg") => Ok(image::ImageFormat::Jpeg),
        Some("webp") => Ok(image::ImageFormat::WebP),
        Some(other) => Err(Error::file(
            path,
            format!("cannot write images as .{other}; use {IMAGE_EXTENSIONS}"),
        )),
        None => Err(Error::file(
            path,
            format!("an image output needs an extension that names its format: {IMAGE_EXTENSIONS}"),
        )),
    }
}

/// The absolute, symlink-free form of a path that may not exist yet: its nearest existing ancestor is
/// canonicalised and the rest appended, with `.` and `..` resolved lexically.
pub fn canonical(path: &Path) -> Result<PathBuf> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|source| Error::Io {
                path: PathBuf::from("."),
                source,
            })?
            .join(path)
    };
    // Component by component: an existing prefix is canonicalised (symlinks resolved), a missing one is
    // extended lexically.
    let mut out = PathBuf::new();
    for part in absolute.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => {
                out.push(other);
                if let Ok(c) = std::fs::canonicalize(&out) {
                    out = c;
                }
            }
        }
    }
    Ok(out)
}

/// The same file on disk (hard links included), when both exist.
fn same_existing_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    let _ = (a, b);
    false
}

struct Entry {
    what: String,
    path: PathBuf,
    canonical: PathBuf,
    /// A folder input: no output may land anywhere inside it.
    folder: bool,
}

/// The inputs and outputs of one command, checked against each other as they are added.
#[derive(Default)]
pub struct OutputPlan {
    inputs: Vec<Entry>,
    outputs: Vec<Entry>,
}

impl OutputPlan {
    pub fn new() -> Self {
        Self::default()
    }

    /// A file (or folder) the command reads; no output may land on it or, for a folder, replace it.
    pub fn input(&mut self, what: &str, path: &Path) -> Result<&mut Self> {
        self.inputs.push(Entry {
            what: what.to_string(),
            path: path.to_path_buf(),
            canonical: canonical(path)?,
            folder: false,
        });
        Ok(self)
    }

    /// A folder the command reads (a model): no output may be written anywhere inside it.
    pub fn input_folder(&mut self, what: &str, path: &Path) -> Result<&mut Self> {
        self.inputs.push(Entry {
            what: what.to_string(),
            path: path.to_path_buf(),
            canonical: canonical(path)?,
            folder: true,
        });
        Ok(self)
    }

    /// A file the command writes: refused when it is an input, another output, or an existing folder.
    pub fn output(&mut self, what: &str, path: &Path) -> Result<&mut Self> {
        let canonical = canonical(path)?;
        if path.is_dir() {
            return Err(Error::file(
                path,
                format!("{what} is an existing folder; give a file name"),
            ));
        }
        for input in &self.inputs {
            if input.folder && canonical.starts_with(&input.canonical) {
                return Err(Error::file(
                    path,
                    format!(
                        "{what} would be written inside the {} ({}); choose a path outside it",
                        input.what,
                        input.path.display()
                    ),
                ));
            }
            if input.canonical == canonical || same_existing_file(&input.path, path) {
                return Err(Error::file(
                    path,
                    format!(
                        "{what} would overwrite the {} ({}); choose another path",
                        input.what,
                        input.path.display()
                    ),
                ));
            }
        }
        for other in &self.outputs {
            if other.canonical == canonical {
                return Err(Error::file(
                    path,
                    format!(
                        "{what} and {} are the same file ({}); give each output its own path",
                        other.what,
                        other.path.display()
                    ),
                ));
            }
        }
        self.outputs.push(Entry {
            what: what.to_string(),
            path: path.to_path_buf(),
            canonical,
            folder: false,
        });
        Ok(self)
    }

    /// An image output: as [`Self::output`], and its extension must name a format stylediff writes.
    pub fn image_output(&mut self, what: &str, path: &Path) -> Result<&mut Self> {
        image_format(path)?;
        self.output(what, path)
    }

    /// Every output's folder exists (or can be created: its nearest existing ancestor is a folder) and accepts
    /// new files. Creates nothing that stays.
    pub fn check_writable(&self) -> Result<()> {
        let mut checked: Vec<PathBuf> = Vec::new();
        for out in &self.outputs {
            let mut dir = out.canonical.parent().map(Path::to_path_buf);
            while let Some(d) = &dir {
                if d.exists() {
                    break;
                }
                dir = d.parent().map(Path::to_path_buf);
            }
            let Some(dir) = dir else { continue };
            if !dir.is_dir() {
                return Err(Error::file(
                    &out.path,
                    format!(
                        "cannot write the {}: {} is a file, not a folder",
                        out.what,
                        dir.display()
                    ),
                ));
            }
            if checked.contains(&dir) {
                continue;
            }
            let probe = dir.join(format!(".stylediff-write-check.{}", std::process::id()));
            match std::fs::File::create(&probe) {
                Ok(_) => {
                    let _ = std::fs::remove_file(&probe);
                }
                Err(e) => {
                    return Err(Error::file(
                        &out.path,
                        format!("cannot write the {} into {}: {e}", out.what, dir.display()),
                    ));
                }
            }
            checked.push(dir);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_under_many_spellings_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.png");
        std::fs::write(&a, b"x").unwrap();
        let mut plan = OutputPlan::new();
        plan.input("input image", &a).unwrap();
        let other_spelling = dir.path().join("sub/../a.png");
        let err = plan
            .output("output", &other_spelling)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("would overwrite the input image"), "{err}");
        plan.output("output", &dir.path().join("b.png")).unwrap();
        let err = plan
            .output("grid", &dir.path().join("./b.png"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("grid and output are the same file"), "{err}");
    }

    #[test]
    fn image_formats_follow_the_extension() {
        assert_eq!(
            image_format(Path::new("x.JPG")).unwrap(),
            image::ImageFormat::Jpeg
        );
        assert!(image_format(Path::new("x.gif")).is_err());
        assert!(image_format(Path::new("x")).is_err());
    }
}
