//! Prompt-to-Prompt's token bookkeeping against the reference seq_aligner.py (tools/make_p2p_fixtures.py) on the
//! real CLIP tokenizer: replaced words, multi-token words, inserted words.

mod common;

use stylediff::control::words::{refinement_mapper, replacement_mapper, word_token_positions};
use stylediff::model::tokenizer::ClipTokenizer;

#[test]
fn token_maps_match_prompt_to_prompt() {
    let Some(shared) = common::shared_fixtures() else {
        return;
    };
    let tok = ClipTokenizer::from_folder(&shared.join("clip-tokenizer")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo_path("tests/fixtures/p2p_alignment.json")).unwrap(),
    )
    .unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    let as_usize = |v: &serde_json::Value| -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect()
    };
    for case in cases {
        let (src, tgt) = (
            case["source"].as_str().unwrap(),
            case["target"].as_str().unwrap(),
        );
        for (word, pos) in case["word_positions"].as_object().unwrap() {
            assert_eq!(
                word_token_positions(&tok, src, word).unwrap(),
                as_usize(&pos["source"]),
                "{word} in {src}"
            );
            assert_eq!(
                word_token_positions(&tok, tgt, word).unwrap(),
                as_usize(&pos["target"]),
                "{word} in {tgt}"
            );
        }
        if let Some(nonzero) = case.get("replace_nonzero") {
            let m = replacement_mapper(&tok, src, tgt, 77).unwrap();
            let mut expected = vec![0f32; 77 * 77];
            for e in nonzero.as_array().unwrap() {
                let e = e.as_array().unwrap();
                expected[e[0].as_u64().unwrap() as usize * 77 + e[1].as_u64().unwrap() as usize] =
                    e[2].as_f64().unwrap() as f32;
            }
            for k in 0..77 * 77 {
                assert!(
                    (m[k] - expected[k]).abs() < 1e-6,
                    "{src} -> {tgt}: entry ({}, {})",
                    k / 77,
                    k % 77
                );
            }
        } else {
            let err = replacement_mapper(&tok, src, tgt, 77)
                .unwrap_err()
                .to_string();
            assert!(err.contains("same number of words"), "{err}");
        }
        let (mapper, alphas) = refinement_mapper(&tok, src, tgt, 77).unwrap();
        let ref_mapper: Vec<i64> = case["refine_mapper"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let ref_alphas: Vec<f32> = case["refine_alphas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(alphas, ref_alphas, "{src} -> {tgt}: alphas");
        for k in 0..77 {
            if ref_alphas[k] > 0.0 {
                assert_eq!(
                    mapper[k] as i64, ref_mapper[k],
                    "{src} -> {tgt}: position {k}"
                );
            }
        }
    }
}
