mod common;

use stylediff::model::tokenizer::ClipTokenizer;

#[derive(serde::Deserialize)]
struct Case {
    prompt: String,
    input_ids_padded_77: Vec<u32>,
    ids_untruncated: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Expected {
    cases: Vec<Case>,
}

#[test]
fn clip_tokenizer_matches_transformers_on_every_case() {
    let Some(fixtures) = common::shared_fixtures() else {
        return;
    };
    let dir = fixtures.join("clip-tokenizer");
    let tok = ClipTokenizer::from_folder(&dir).unwrap();
    let expected: Expected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected_ids.json")).unwrap())
            .unwrap();
    assert!(expected.cases.len() >= 20);
    let mut failures = Vec::new();
    for case in &expected.cases {
        let untruncated = tok.encode_untruncated(&case.prompt).unwrap();
        let padded = tok.encode_padded(&case.prompt).unwrap();
        if untruncated != case.ids_untruncated || padded != case.input_ids_padded_77 {
            failures.push(format!(
                "{:?}: got {:?}, expected {:?}",
                case.prompt, untruncated, case.ids_untruncated
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The same vocabulary given as tokenizer.json (as recent transformers write it) gives the same ids.
#[test]
fn tokenizer_json_layout_gives_the_same_ids() {
    let dir = common::repo_path("tests/fixtures/sd1-tiny/tokenizer-json");
    if !dir.is_dir() {
        panic!("missing fixture {}", dir.display());
    }
    let from_json = ClipTokenizer::from_folder(&dir).unwrap();
    let from_bpe =
        ClipTokenizer::from_folder(&common::repo_path("tests/fixtures/sd1-tiny/tokenizer"))
            .unwrap();
    for prompt in [
        "a cat sitting next to a mirror",
        "A Photo OF a CAT!!",
        "",
        "pixel-art style, 8-bit",
    ] {
        assert_eq!(
            from_json.encode_padded(prompt).unwrap(),
            from_bpe.encode_padded(prompt).unwrap(),
            "{prompt:?}"
        );
    }
}

#[test]
fn missing_tokenizer_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_folder(dir.path())
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("vocab.json") && err.contains(&dir.path().display().to_string()),
        "{err}"
    );
}
