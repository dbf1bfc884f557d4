//! The bundled toy model. Its files are compiled into the binary (see build.rs) and written once to a cache
//! folder, `$STYLEDIFF_CACHE` or `$XDG_CACHE_HOME/stylediff` or `~/.cache/stylediff`, named by a hash of their
//! contents, so every command can load it like any other diffusers folder.

use std::path::PathBuf;

use crate::util::write_atomic;
use crate::{Error, Result};

include!(concat!(env!("OUT_DIR"), "/bundled_toy_model.rs"));

fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("STYLEDIFF_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("stylediff");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("stylediff"),
        None => std::env::temp_dir().join("stylediff"),
    }
}

pub fn is_available() -> bool {
    !BUNDLED_TOY_MODEL.is_empty()
}

/// The folder of the bundled toy model, written on first use.
pub fn toy_model_dir() -> Result<PathBuf> {
    if !is_available() {
        return Err(Error::invalid(
            "model",
            "this build has no bundled toy model (built without the toy-model feature, or models/toy was absent); give a model folder",
        ));
    }
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (name, bytes) in BUNDLED_TOY_MODEL {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    let dir = cache_root().join(format!(
        "toy-{}",
        &crate::image_io::hex(&h.finalize())[..16]
    ));
    let done = dir.join(".complete");
    if done.is_file() {
        return Ok(dir);
    }
    for (name, bytes) in BUNDLED_TOY_MODEL {
        write_atomic(&dir.join(name), bytes)?;
    }
    write_atomic(&done, b"")?;
    Ok(dir)
}
