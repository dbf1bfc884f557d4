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
fn tau_lists_sweep_and_batch_resumes() {
    let Some(shared) = common::shared_fixtures() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A copy of one authors' row with a two-value tau_c sweep, next to a copy of its image.
    let src =
        shared.join("stylediffusion-official/example_images/black and white cat on floor.jpg");
    std::fs::create_dir_all(dir.path().join("example_images")).unwrap();
    std::fs::copy(&src, dir.path().join("example_images/cat.jpg")).unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let csv = dir.path().join("data/cases.csv");
    std::fs::write(
        &csv,
        ",case_number,prompt,image_path,url,target,blend_word,eq_params,tau_v,tau_c,tau_s,tau_u,edit_type\n\
         0,7,black and white cat on floor,./example_images/cat.jpg,,black and white dog on floor,\"[('cat',),('dog',)]\",\"[('dog',),(2,)]\",\"[.6,]\",\"[.2,.4]\",\"[.6,]\",\"[.4,]\",Replacement\n\
         1,8,a dog,./example_images/missing.jpg,,a sitting dog,\"[('dog',),('dog',)]\",\"[('sitting',),(8,)]\",\"[.1,]\",\"[.2,]\",\"[.2,]\",\"[.0,]\",Refinement",
    )
    .unwrap();
    let cases = read_csv(&csv).unwrap();
    assert_eq!(cases[0].edits.len(), 2);
    let out = dir.path().join("out");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_stylediff"))
            .args([
                "batch",
                "--model",
                common::repo_path("tests/fixtures/sd1-tiny")
                    .to_str()
                    .unwrap(),
                "--csv",
                csv.to_str().unwrap(),
                "--out-dir",
                out.to_str().unwrap(),
                "--steps",
                "3",
                "--inner-steps",
                "2",
            ])
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(
        table.lines().filter(|l| l.contains(",done,")).count(),
        3,
        "{table}"
    );
    assert!(
        table.contains("failed") && table.contains("missing.jpg"),
        "{table}"
    );
    assert!(out.join("case_7/edit_v0.6_c0.2_s0.6_u0.4.png").is_file());
    let o = run();
    assert!(o.status.success());
    let table = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(
        table.lines().filter(|l| l.contains("skipped")).count(),
        3,
        "{table}"
    );
}
