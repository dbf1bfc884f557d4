//! Embeds the bundled toy model (models/toy) into the binary, so `--model` has a default even for a binary
//! installed with `cargo install`. Without that folder the list is empty and the commands ask for `--model`.

use std::path::{Path, PathBuf};

fn collect(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            collect(root, &p, out);
        } else {
            out.push(p.strip_prefix(root).expect("under root").to_path_buf());
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .join("models/toy");
    println!("cargo:rerun-if-changed=models/toy");
    let mut files = Vec::new();
    // Without the `toy-model` feature the list stays empty and the library asks for a model.
    if std::env::var_os("CARGO_FEATURE_TOY_MODEL").is_some() {
        collect(&root, &root, &mut files);
    }
    let mut code = String::from("pub const BUNDLED_TOY_MODEL: &[(&str, &[u8])] = &[\n");
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
        code.push_str(&format!(
            "    ({:?}, include_bytes!({:?})),\n",
            f.to_string_lossy(),
            root.join(f).display().to_string()
        ));
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"))
        .join("bundled_toy_model.rs");
    std::fs::write(out, code).expect("write generated list");
}
