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
#[allow(dead_code)]
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
