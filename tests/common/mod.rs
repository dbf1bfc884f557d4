#![allow(dead_code)]
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// The largest absolute difference of two tensors of one shape.
pub fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .unwrap()
}

pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let target = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &target);
        } else {
            std::fs::copy(&p, &target).unwrap();
        }
    }
}

/// Rewrites the single safetensors file of `folder` through `edit`.
pub fn edit_weights(
    folder: &std::path::Path,
    edit: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) {
    let file = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let mut tensors = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &file).unwrap();
}

/// Runs the stylediff binary with `args`.
pub fn stylediff<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_stylediff"))
        .args(args)
        .output()
        .unwrap()
}

/// stdout then stderr of a run, as text.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The device the numerical tests run on: the CPU, or `STYLEDIFF_TEST_DEVICE=cuda` / `metal` (GPU builds; see
/// tools/gpu-check.sh).
pub fn test_device() -> candle_core::Device {
    match std::env::var("STYLEDIFF_TEST_DEVICE").as_deref() {
        Ok("cuda") => {
            candle_core::Device::new_cuda(0).expect("STYLEDIFF_TEST_DEVICE=cuda: no CUDA device")
        }
        Ok("metal") => {
            candle_core::Device::new_metal(0).expect("STYLEDIFF_TEST_DEVICE=metal: no Metal device")
        }
        Ok("cpu") | Err(_) => candle_core::Device::Cpu,
        Ok(other) => panic!("STYLEDIFF_TEST_DEVICE={other}: expected cpu, cuda or metal"),
    }
}

// Batch fixtures and checks shared by tests/scale_out.rs and tests/slurm.rs.

/// A CSV in the authors' layout with `n` toy cases (0, 1 or 2 edits each) and their photos, in `dir`.
pub fn toy_batch(dir: &Path, n: usize) -> PathBuf {
    let scenes = [
        ("a red circle on a blue background", "red", "green"),
        ("a green square on a yellow background", "green", "red"),
        ("a blue triangle on a white background", "blue", "red"),
        ("a yellow circle on a black background", "yellow", "blue"),
    ];
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let mut csv = String::from(
        ",case_number,prompt,image_path,url,target,blend_word,eq_params,tau_v,tau_c,tau_s,tau_u,edit_type\n",
    );
    for k in 0..n {
        let (caption, from, to) = scenes[k % scenes.len()];
        let image = dir.join(format!("images/{k}.png"));
        let o = Command::new(env!("CARGO_BIN_EXE_stylediff"))
            .args(["toy", "render", "--caption", caption, "--layout-seed"])
            .arg(k.to_string())
            .arg("--out")
            .arg(&image)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let target = caption.replace(from, to);
        let row = match k % 3 {
            0 => format!("{k},c{k},{caption},./images/{k}.png,,,,,,,,,\n"),
            1 => format!(
                "{k},c{k},{caption},./images/{k}.png,,{target},,,\"[.5,]\",\"[.6,]\",\"[.6,]\",\"[.0,]\",Replacement\n"
            ),
            _ => format!(
                "{k},c{k},{caption},./images/{k}.png,,{target},,,\"[.5,]\",\"[.4,.8]\",\"[.6,]\",\"[.0,]\",Replacement\n"
            ),
        };
        csv.push_str(&row);
    }
    let path = dir.join("cases.csv");
    std::fs::write(&path, csv).unwrap();
    path
}

/// (case, job) -> how many times a run's log says it was done.
pub fn done_counts(logs: &[String]) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for log in logs {
        for line in log.lines() {
            if let Some(rest) = line.strip_prefix("case ")
                && let Some((head, status)) = rest.split_once(": ")
                && (status == "done" || status.starts_with("done ("))
            {
                let (case, job) = head.split_once(' ').unwrap();
                *counts
                    .entry((case.to_string(), job.to_string()))
                    .or_default() += 1;
            }
        }
    }
    counts
}

/// Every job of the CSV: each case's inversion and edits.
pub fn all_jobs(csv: &Path) -> Vec<(String, String)> {
    stylediff::batch::read_csv(csv)
        .unwrap()
        .iter()
        .flat_map(|c| {
            std::iter::once((c.case.clone(), "inversion".to_string()))
                .chain(c.edits.iter().map(|(v, _)| (c.case.clone(), v.clone())))
        })
        .collect()
}

/// Every result file (inversions, edits, grids) of `a` equals `b`'s, byte for byte.
pub fn same_results(a: &Path, b: &Path) -> usize {
    let mut compared = 0;
    for case in std::fs::read_dir(a).unwrap() {
        let case = case.unwrap().path();
        if !case.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&case).unwrap() {
            let f = f.unwrap().path();
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            if name.ends_with(".png") || name.ends_with(".safetensors") {
                let other = b.join(case.file_name().unwrap()).join(&name);
                assert_eq!(
                    std::fs::read(&f).unwrap(),
                    std::fs::read(&other).unwrap_or_default(),
                    "{} differs from {}",
                    f.display(),
                    other.display()
                );
                compared += 1;
            }
        }
    }
    compared
}
