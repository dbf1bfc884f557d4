//! The authors' CSVs, read as they are: Python literals, sweeps, relative image paths, resumable runs.

mod common;

use std::process::Command;

use stylediff::batch::{Literal, read_csv};

#[test]
fn python_literals_parse() {
    assert_eq!(
        Literal::parse("[('cat',),('tiger',)]").unwrap(),
        Literal::Seq(vec![
            Literal::Seq(vec![Literal::Str("cat".into())]),
            Literal::Seq(vec![Literal::Str("tiger".into())])
        ])
    );
    assert_eq!(
        Literal::parse("[.5, .6,]").unwrap().numbers(),
        vec![0.5, 0.6]
    );
    assert_eq!(
        Literal::parse("[('tiger','ball'),(2, 1.5)]")
            .unwrap()
            .strings(),
        vec!["tiger", "ball"]
    );
    assert!(
        Literal::parse("[('cat',")
            .unwrap_err()
            .to_string()
            .contains("cat")
    );
}

#[test]
fn authors_csvs_read_as_they_are() {
    let Some(shared) = common::shared_fixtures() else {
        return;
    };
    let data = shared.join("stylediffusion-official/data");
    let cases = read_csv(&data.join("stylediffusion_editing.csv")).unwrap();
    assert_eq!(cases.len(), 4);
    let c0 = &cases[0];
    assert_eq!(c0.prompt, "a cat sitting next to a mirror");
    assert!(c0.image.is_file(), "{}", c0.image.display());
    let (_, s) = &c0.edits[0];
    assert_eq!(s.target, "a tiger sitting next to a mirror");
    assert_eq!(
        s.blend,
        Some((vec!["cat".to_string()], vec!["tiger".to_string()]))
    );
    assert_eq!(s.reweight, vec![("tiger".to_string(), 2.0)]);
    assert_eq!((s.tau_v, s.tau_c, s.tau_s, s.tau_u), (0.5, 0.6, 0.8, 0.5));
    assert_eq!(cases[3].edits[0].1.mode, stylediff::edit::EditMode::Refine);
    let prompts = read_csv(&data.join("stylediffusion_prompts.csv")).unwrap();
    assert!(
        prompts.iter().all(|c| c.edits.is_empty()),
        "prompt CSVs only invert"
    );
}

#[test]
fn tau_lists_sweep_and_batch_resumes_only_from_matching_results() {
    let Some(shared) = common::shared_fixtures() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A copy of one authors' row with a two-value tau_c sweep, next to copies of its image.
    let src =
        shared.join("stylediffusion-official/example_images/black and white cat on floor.jpg");
    std::fs::create_dir_all(dir.path().join("example_images")).unwrap();
    std::fs::copy(&src, dir.path().join("example_images/cat.jpg")).unwrap();
    std::fs::copy(&src, dir.path().join("example_images/cat2.jpg")).unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let csv = dir.path().join("data/cases.csv");
    let header = ",case_number,prompt,image_path,url,target,blend_word,eq_params,tau_v,tau_c,tau_s,tau_u,edit_type\n";
    let row7 = "0,7,black and white cat on floor,./example_images/cat.jpg,,black and white dog on floor,\"[('cat',),('dog',)]\",\"[('dog',),(2,)]\",\"[.6,]\",\"[.2,.4]\",\"[.6,]\",\"[.4,]\",Replacement\n";
    let row8 = "1,8,a dog,./example_images/missing.jpg,,a sitting dog,\"[('dog',),('dog',)]\",\"[('sitting',),(8,)]\",\"[.1,]\",\"[.2,]\",\"[.2,]\",\"[.0,]\",Refinement\n";
    let row9 = "2,9,a cat,./example_images/cat2.jpg,,a sitting cat,\"[('cat',),('cat',)]\",\"[('sitting',),(3,)]\",\"[.1,]\",\"[.2,]\",\"[.2,]\",\"[.0,]\",Refinement\n";
    std::fs::write(&csv, format!("{header}{row7}{row8}")).unwrap();
    let cases = read_csv(&csv).unwrap();
    assert_eq!(cases[0].edits.len(), 2);
    let out = dir.path().join("out");
    let run = |model: &std::path::Path, extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_stylediff"))
            .args([
                "batch",
                "--model",
                model.to_str().unwrap(),
                "--csv",
                csv.to_str().unwrap(),
                "--out-dir",
                out.to_str().unwrap(),
                "--steps",
                "3",
                "--inner-steps",
                "2",
            ])
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stderr).to_string();
        let table = std::fs::read_to_string(out.join("results.csv")).unwrap_or_default();
        (o.status.success(), text, table)
    };
    let tiny = common::repo_path("tests/fixtures/sd1-tiny");
    let count = |table: &str, what: &str| table.lines().filter(|l| l.contains(what)).count();

    // A missing image is found before any work: nothing is run or written.
    let (ok, err, _) = run(&tiny, &[]);
    assert!(
        !ok && err.contains("missing.jpg") && err.contains("case 8"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written when the CSV is refused");

    std::fs::write(&csv, format!("{header}{row7}{row9}")).unwrap();
    let (ok, err, table) = run(&tiny, &[]);
    assert!(ok, "{err}");
    assert_eq!(count(&table, ",done,"), 5, "{table}");
    assert!(err.contains("5 done, 0 skipped"), "{err}");
    assert!(out.join("case_7/edit_v0.6_c0.2_s0.6_u0.4.png").is_file());
    assert!(
        out.join("case_7/edit_v0.6_c0.2_s0.6_u0.4.png.json")
            .is_file(),
        "settings recorded"
    );
    let recorded =
        stylediff::util::read_image_settings(&out.join("case_7/edit_v0.6_c0.2_s0.6_u0.4.png"))
            .unwrap()
            .unwrap();
    assert_eq!(recorded["target_prompt"], "black and white dog on floor");
    assert_eq!(
        (
            recorded["edit"]["tau_c"].as_f64(),
            recorded["edit"]["tau_u"].as_f64()
        ),
        (Some(0.2), Some(0.4))
    );
    assert_eq!(recorded["inversion"]["steps"], 3);

    // Same inputs: everything skipped.
    let (ok, err, table) = run(&tiny, &[]);
    assert!(ok, "{err}");
    assert_eq!(count(&table, "skipped"), 5, "{table}");

    // Another guidance changes every result.
    let (ok, _, table) = run(&tiny, &["--guidance", "5"]);
    assert!(ok);
    assert_eq!(count(&table, ",done,"), 5, "{table}");

    // Case 9's photo changes (same name): only case 9 is recomputed; a tampered edit of case 7 is redone.
    let img = image::open(dir.path().join("example_images/cat2.jpg")).unwrap();
    img.fliph()
        .save(dir.path().join("example_images/cat2.jpg"))
        .unwrap();
    std::fs::write(out.join("case_7/edit_v0.6_c0.4_s0.6_u0.4.png"), b"tampered").unwrap();
    let (ok, err, table) = run(&tiny, &["--guidance", "5"]);
    assert!(ok, "{err}");
    let done: Vec<&str> = table.lines().filter(|l| l.contains(",done,")).collect();
    assert_eq!(done.len(), 3, "{table}");
    assert!(
        done.iter().filter(|l| l.starts_with("9,")).count() == 2,
        "{table}"
    );
    assert!(
        done.iter().any(|l| l.contains("v0.6_c0.4_s0.6_u0.4")),
        "{table}"
    );

    // Jobs that fail at run time: the failures reach stderr though it is not a terminal, results.csv lists them,
    // and the exit status is non-zero.
    let broken = dir.path().join("broken-model");
    common::copy_dir(&tiny, &broken);
    common::edit_weights(&broken.join("vae"), |t| {
        let w = t.get_mut("decoder.conv_out.weight").unwrap();
        *w = (w.ones_like().unwrap() * 3e38).unwrap();
    });
    let out2 = dir.path().join("out2");
    let o = Command::new(env!("CARGO_BIN_EXE_stylediff"))
        .args([
            "batch",
            "--model",
            broken.to_str().unwrap(),
            "--csv",
            csv.to_str().unwrap(),
        ])
        .args([
            "--out-dir",
            out2.to_str().unwrap(),
            "--steps",
            "2",
            "--inner-steps",
            "1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("case 7") && err.contains("NaN or infinite"),
        "{err}"
    );
    assert!(err.contains("0 done, 0 skipped, 5 failed"), "{err}");
    let table = std::fs::read_to_string(out2.join("results.csv")).unwrap();
    assert!(table.contains("failed"), "{table}");
    // The merge counts them as failed (not done, not missing), exits non-zero and says how to retry.
    let o = common::stylediff(&[
        "batch",
        "merge",
        "--csv",
        csv.to_str().unwrap(),
        "--out-dir",
        out2.to_str().unwrap(),
    ]);
    let said = common::text(&o);
    assert!(!o.status.success(), "{said}");
    assert!(said.contains("0 done, 2 failed, 0 missing"), "{said}");
    assert!(said.contains("case 7 (shard 0/1): failed"), "{said}");
    assert!(
        said.lines()
            .any(|l| l.trim_start().starts_with("stylediff batch --csv") && l.contains("--model")),
        "{said}"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out2.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["failed"], 2, "{summary}");
}

#[test]
fn unsafe_or_repeated_case_numbers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("cases.csv");
    let header = "case_number,prompt,image_path\n";
    for (rows, needle) in [
        ("x/../../../escaped,a cat,cat.png\n", "x/../../../escaped"),
        (".hidden,a cat,cat.png\n", "'.'"),
        ("1,a cat,cat.png\n1,a dog,dog.png\n", "repeats row 2"),
        (",a cat,cat.png\n", "empty"),
    ] {
        std::fs::write(&csv, format!("{header}{rows}")).unwrap();
        let e = read_csv(&csv).unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains("case"), "{e}");
    }
    std::fs::write(&csv, format!("{header}case-1.b_2,a cat,cat.png\n")).unwrap();
    assert_eq!(read_csv(&csv).unwrap()[0].case, "case-1.b_2");
}
