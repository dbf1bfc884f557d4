#![allow(dead_code)]
use std::path::PathBuf;

/// `../shared/fixtures` beside the checkout; `None` (with a printed reason) outside this workplace.
pub fn shared_fixtures() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: {} is absent (shared fixtures exist only in the stylediff workplace)",
            p.display()
        );
        None
    }
}

pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}
