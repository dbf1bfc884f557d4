//! `stylediff engine`: random-weight pipelines that load and pass the architecture audit, and the benchmark's
//! report (every part timed, FLOPs counted). Timings themselves are never asserted.

mod common;

use common::{repo_path, stylediff, text};

fn random_model(dir: &std::path::Path, name: &str, seed: u64) -> std::path::PathBuf {
    let tiny = repo_path("tests/fixtures/sd1-tiny");
    let out = dir.join(name);
    let o = stylediff(&[
        "engine".as_ref(),
        "random-model".as_ref(),
        "--config".as_ref(),
        tiny.as_os_str(),
        "--image-encoder-config".as_ref(),
        tiny.join("image_encoder").as_os_str(),
        "--seed".as_ref(),
        seed.to_string().as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    out
}

#[test]
fn a_random_model_has_every_tensor_the_architecture_asks_for_and_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let a = random_model(dir.path(), "a", 3);
    let o = stylediff(&["inspect".as_ref(), "--model".as_ref(), a.as_os_str()]);
    assert!(o.status.success(), "{}", text(&o));
    let report = text(&o);
    assert!(
        !report.contains("missing") && !report.contains("unexpected"),
        "{report}"
    );

    let weights = |m: &std::path::Path| {
        std::fs::read(m.join("unet/diffusion_pytorch_model.safetensors")).unwrap()
    };
    let b = random_model(dir.path(), "b", 3);
    let c = random_model(dir.path(), "c", 4);
    assert_eq!(weights(&a), weights(&b), "same seed, same weights");
    assert_ne!(weights(&a), weights(&c), "another seed, other weights");

    // The folder exists now: a second write there is refused and leaves it as it was.
    let before = weights(&a);
    let tiny = repo_path("tests/fixtures/sd1-tiny");
    let o = stylediff(&[
        "engine".as_ref(),
        "random-model".as_ref(),
        "--config".as_ref(),
        tiny.as_os_str(),
        "--out".as_ref(),
        a.as_os_str(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("existing folder"), "{}", text(&o));
    assert_eq!(weights(&a), before);
}

#[test]
fn the_benchmark_times_every_part_and_counts_its_flops() {
    let dir = tempfile::tempdir().unwrap();
    let model = random_model(dir.path(), "m", 0);
    let out = dir.path().join("bench");
    let o = stylediff(&[
        "engine".as_ref(),
        "bench".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--size".as_ref(),
        "64".as_ref(),
        "--repeats".as_ref(),
        "2".as_ref(),
        "--warmup".as_ref(),
        "0".as_ref(),
        "--out-dir".as_ref(),
        out.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["size"], 64);
    assert_eq!(report["dtype"], "f32");
    assert!(report["threads"].as_u64().unwrap() >= 1);
    let rows = report["rows"].as_array().unwrap();
    let parts: Vec<&str> = rows.iter().map(|r| r["part"].as_str().unwrap()).collect();
    assert_eq!(
        parts,
        [
            "load",
            "text-encoder",
            "image-encoder",
            "unet-batch1",
            "unet-batch2",
            "unet-forward-backward",
            "vae-encode",
            "vae-decode"
        ]
    );
    let gflop = |part: &str| {
        rows.iter().find(|r| r["part"] == part).unwrap()["gflop"]
            .as_f64()
            .unwrap()
    };
    for r in rows {
        assert_eq!(r["runs"], 2, "{r}");
        let s = r["seconds"].as_f64().unwrap();
        assert!(s.is_finite() && s > 0.0, "{r}");
        assert!(r["seconds_min"].as_f64().unwrap() <= s, "{r}");
        if r["part"] != "load" {
            assert!(gflop(r["part"].as_str().unwrap()) > 0.0, "{r}");
        }
    }
    // A batch of two latents is twice the work of one; forward+backward more than the forward.
    let ratio = gflop("unet-batch2") / gflop("unet-batch1");
    assert!((ratio - 2.0).abs() < 1e-9, "batch 2 / batch 1 = {ratio}");
    assert!(gflop("unet-forward-backward") > 2.0 * gflop("unet-batch1"));
    // The table went to stdout.
    assert!(String::from_utf8_lossy(&o.stdout).contains("unet-forward-backward"));
}

#[test]
fn the_benchmark_refuses_bad_settings_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = repo_path("tests/fixtures/sd1-tiny");
    for (flag, value, expect) in [("--size", "4", "size"), ("--repeats", "0", "repeats")] {
        let o = stylediff(&[
            "engine".as_ref(),
            "bench".as_ref(),
            "--model".as_ref(),
            tiny.as_os_str(),
            flag.as_ref(),
            value.as_ref(),
            "--out-dir".as_ref(),
            dir.path().join("b").as_os_str(),
        ]);
        assert!(!o.status.success());
        assert!(text(&o).contains(expect), "{}", text(&o));
        assert!(!dir.path().join("b/report.json").exists());
    }
}
