//! The studio's inversions on disk, content-addressed: an inversion's id is the fingerprint of everything that
//! made it (model, pixels, prompt, settings), so the same request finds the same folder, and a restart lists what
//! is there. Each folder holds the artifact (`inversion.safetensors` and its metadata), the input and the
//! reconstruction, and `edits/` with every edit made from it; everything is written atomically, the artifact last,
//! so a crash leaves no inversion that looks finished. Ids are checked to be hex before they touch a path.

use std::path::{Path, PathBuf};

use crate::invert::{Inversion, artifact};
use crate::util::{save_image_with_settings, write_atomic};
use crate::{Error, Result};

/// Length of an id in hex digits.
const ID_LEN: usize = 32;

pub struct Store {
    root: PathBuf,
}

/// What the inversion list shows.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InversionSummary {
    pub id: String,
    pub prompt: String,
    pub method: String,
    pub steps: usize,
    pub recon_psnr: f64,
    /// Edits made from it, newest last.
    pub edits: Vec<EditSummary>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct EditSummary {
    pub id: String,
    /// The settings recorded in the PNG.
    pub settings: serde_json::Value,
}

/// An id that may name a folder: exactly 32 lowercase hex digits.
pub fn check_id(what: &'static str, id: &str) -> Result<()> {
    if id.len() == ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(Error::invalid(
            what,
            format!("{id:?} is not an id of this studio"),
        ))
    }
}

/// A short id from a fingerprint of `value`.
pub fn id_of(value: &impl serde::Serialize) -> String {
    crate::batch::fingerprint(value)[..ID_LEN].to_string()
}

impl Store {
    pub fn open(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(|source| Error::Io {
            path: root.to_path_buf(),
            source,
        })?;
        // Temporary folders of inversions a crash interrupted.
        for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn artifact(&self, id: &str) -> PathBuf {
        self.dir(id).join("inversion.safetensors")
    }

    /// The id an inversion gets: its model, pixels, prompt and settings.
    pub fn inversion_id(inv: &Inversion) -> String {
        id_of(&(
            &inv.model_id,
            &inv.image_sha256,
            &inv.source_prompt,
            &inv.settings,
        ))
    }

    /// Keeps an inversion with its input and reconstruction images; returns its id. Everything is written into a
    /// temporary folder that is then renamed into place, so a crash leaves no half-written inversion.
    pub fn save(&self, inv: &Inversion, reconstruction: &image::RgbImage) -> Result<String> {
        let id = Self::inversion_id(inv);
        if self.exists(&id) {
            // The same inputs made it before; the result is the same.
            return Ok(id);
        }
        let tmp = self.root.join(format!(".tmp-{id}-{}", std::process::id()));
        let io = |path: &Path, source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        let input = crate::util::tensor_to_image(&inv.image)?;
        crate::util::save_png(&tmp.join("input.png"), &input)?;
        crate::util::save_png(&tmp.join("reconstruction.png"), reconstruction)?;
        artifact::save(inv, &tmp.join("inversion.safetensors"))?;
        let dir = self.dir(&id);
        if dir.exists() {
            // A folder without a finished artifact: left by an older crash.
            std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
        Ok(id)
    }

    pub fn exists(&self, id: &str) -> bool {
        check_id("inversion", id).is_ok() && self.artifact(id).is_file()
    }

    pub fn load(&self, id: &str, device: &candle_core::Device) -> Result<Inversion> {
        check_id("inversion", id)?;
        if !self.exists(id) {
            return Err(Error::invalid(
                "inversion",
                format!("{id} is not known here"),
            ));
        }
        artifact::load(&self.artifact(id), device)
    }

    /// A PNG of an inversion: `input`, `reconstruction`, or an edit by id.
    pub fn image_path(&self, id: &str, name: &str) -> Result<PathBuf> {
        check_id("inversion", id)?;
        let path = match name {
            "input" | "reconstruction" => self.dir(id).join(format!("{name}.png")),
            edit => {
                check_id("edit", edit)?;
                self.dir(id).join("edits").join(format!("{edit}.png"))
            }
        };
        if path.is_file() {
            Ok(path)
        } else {
            Err(Error::invalid(
                "image",
                format!("{id}/{name} is not known here"),
            ))
        }
    }

    /// Keeps an edit's PNG (its settings embedded); returns the edit's id, a fingerprint of its settings.
    pub fn save_edit(
        &self,
        id: &str,
        image: &image::RgbImage,
        settings: &serde_json::Value,
    ) -> Result<String> {
        check_id("inversion", id)?;
        let edit_id = id_of(settings);
        let dir = self.dir(id).join("edits");
        save_image_with_settings(&dir.join(format!("{edit_id}.png")), image, settings)?;
        let mut order = self.edit_order(id);
        order.retain(|e| e != &edit_id);
        order.push(edit_id.clone());
        write_atomic(
            &dir.join("order.json"),
            serde_json::to_string(&order)
                .expect("serialisable")
                .as_bytes(),
        )?;
        Ok(edit_id)
    }

    fn edit_order(&self, id: &str) -> Vec<String> {
        std::fs::read(self.dir(id).join("edits").join("order.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<String>>(&b).ok())
            .unwrap_or_default()
    }

    /// Every finished inversion, oldest first, with its edits.
    pub fn list(&self) -> Vec<InversionSummary> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut found: Vec<(std::time::SystemTime, InversionSummary)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let id = e.file_name().to_string_lossy().to_string();
                check_id("inversion", &id).ok()?;
                let meta_path = artifact::sidecar(&self.artifact(&id));
                let modified = std::fs::metadata(&meta_path).ok()?.modified().ok()?;
                let meta: artifact::ArtifactMeta =
                    serde_json::from_slice(&std::fs::read(&meta_path).ok()?).ok()?;
                if !self.artifact(&id).is_file() {
                    return None;
                }
                let edits = self
                    .edit_order(&id)
                    .into_iter()
                    .filter_map(|edit| {
                        let png = self.dir(&id).join("edits").join(format!("{edit}.png"));
                        let settings = crate::util::read_image_settings(&png).ok()??;
                        Some(EditSummary { id: edit, settings })
                    })
                    .collect();
                Some((
                    modified,
                    InversionSummary {
                        id,
                        prompt: meta.source_prompt,
                        method: meta.method,
                        steps: meta.settings.steps,
                        recon_psnr: meta.recon_psnr,
                        edits,
                    },
                ))
            })
            .collect();
        found.sort_by_key(|(t, s)| (*t, s.id.clone()));
        found.into_iter().map(|(_, s)| s).collect()
    }
}
