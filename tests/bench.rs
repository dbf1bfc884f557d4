//! A small benchmark run completes and writes well-formed results (quality claims live in docs/benchmark.md).

mod common;

use std::process::Command;

#[test]
fn small_bench_writes_well_formed_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let args = [
        "bench",
        "--cases",
        "2",
        "--seed",
        "3",
        "--steps",
        "4",
        "--inner-steps",
        "3",
        "--out-dir",
        out.to_str().unwrap(),
    ];
    let o = Command::new(env!("CARGO_BIN_EXE_stylediff"))
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    let header: Vec<&str> = lines[0].split(',').collect();
    for col in [
        "case",
        "method",
        "edit_kind",
        "psnr_gt",
        "ssim_gt",
        "psnr_unchanged",
        "success",
        "clip_score",
        "structure_dist",
        "recon_psnr",
        "seconds",
        "unet_evals",
        "peak_mb",
    ] {
        assert!(header.contains(&col), "column {col}");
    }
    assert_eq!(lines.len(), 1 + 2 * 6, "one row per case and method");
    let methods = [
        "ddim",
        "null-text",
        "negative-prompt",
        "stylediffusion-p2p",
        "stylediffusion-p2plus",
        "stylediffusion-noreg",
    ];
    for line in &lines[1..] {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), header.len(), "{line}");
        assert!(methods.contains(&cells[1]), "{line}");
        for (name, cell) in header.iter().zip(&cells) {
            if [
                "psnr_gt",
                "ssim_gt",
                "clip_score",
                "structure_dist",
                "recon_psnr",
                "seconds",
            ]
            .contains(name)
            {
                assert!(cell.parse::<f64>().unwrap().is_finite(), "{name} = {cell}");
            }
        }
        let evals: usize = cells[header.iter().position(|h| *h == "unet_evals").unwrap()]
            .parse()
            .unwrap();
        assert!(
            evals >= 8,
            "inversion and editing evaluate the UNet ({evals})"
        );
    }
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    for m in methods {
        assert!(summary.contains(&format!("| {m} | 2 |")), "{m} in summary");
    }
    assert!(summary.contains("Paired with null-text"), "{summary}");

    // A rerun finds both cases finished and rebuilds the same table without running them again.
    let again = Command::new(env!("CARGO_BIN_EXE_stylediff"))
        .args(args)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(
        std::fs::read_to_string(out.join("results.csv")).unwrap(),
        csv
    );
    let gallery = image::open(out.join("gallery.png")).unwrap();
    assert_eq!(
        gallery.width(),
        8 * (32 * 3 + 2),
        "input | ground truth | six methods"
    );
}
