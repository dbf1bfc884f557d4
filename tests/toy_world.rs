//! The toy world: caption grammar, renderer, tokenizer, edits with ground truth, and the attribute checker.

use rand::SeedableRng;
use stylediff::model::tokenizer::ClipTokenizer;
use stylediff::toy::check::detect;
use stylediff::toy::edits::{EditKind, EditPair};
use stylediff::toy::pairs::{random_pairs, render_pair, write_pairs};
use stylediff::toy::render::{render, silhouette};
use stylediff::toy::tokenizer::write_toy_tokenizer;
use stylediff::toy::train::TOY_SIZE;
use stylediff::toy::world::{Color, HELD_OUT_LAYOUT_SEEDS, SceneSpec, Shape, Style, vocabulary};

fn spec(caption: &str) -> SceneSpec {
    SceneSpec::parse(caption).unwrap()
}

#[test]
fn captions_round_trip_through_the_grammar() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut two = 0;
    for _ in 0..2000 {
        let s = SceneSpec::random(&mut rng);
        two += (s.objects.len() == 2) as usize;
        assert!(
            s.objects
                .iter()
                .all(|o| o.color != s.background && o.color != Color::Gray)
        );
        assert_eq!(
            SceneSpec::parse(&s.caption()).unwrap(),
            s,
            "{}",
            s.caption()
        );
    }
    assert!(
        two > 300 && two < 900,
        "both one- and two-object scenes are drawn ({two})"
    );
    assert_eq!(
        spec("a striped red circle on a blue background").objects[0].style,
        Style::Striped
    );
    assert_eq!(
        spec("a red circle and a green square on a white background")
            .objects
            .len(),
        2
    );
}

#[test]
fn bad_captions_are_refused_with_the_word_named() {
    for (caption, needle) in [
        ("a red circle on a red background", "background's colour"),
        ("a red hexagon on a blue background", "hexagon"),
        ("a teal circle on a blue background", "teal"),
        ("a plain red circle on a blue background", "plain"),
        ("a gray circle on a blue background", "gray"),
        ("red circle", "expected"),
    ] {
        let err = SceneSpec::parse(caption).unwrap_err().to_string();
        assert!(err.contains(needle), "{caption}: {err}");
    }
}

#[test]
fn rendering_is_deterministic_anti_aliased_and_follows_the_layout_seed() {
    let s = spec("a red circle on a blue background");
    let a = render(&s.layout(5, TOY_SIZE), TOY_SIZE);
    assert_eq!(a, render(&s.layout(5, TOY_SIZE), TOY_SIZE));
    assert_ne!(a, render(&s.layout(6, TOY_SIZE), TOY_SIZE));
    let (red, blue) = (Color::Red.rgb(), Color::Blue.rgb());
    let mixed = a
        .chunks(3)
        .filter(|p| p[0] > blue[0] + 0.05 && p[0] < red[0] - 0.05)
        .count();
    assert!(mixed > 5, "edge pixels are blended ({mixed})");
    // Every style is visibly different from plain.
    let plain = render(
        &spec("a green square on a white background").layout(2, TOY_SIZE),
        TOY_SIZE,
    );
    for style in ["striped", "dotted", "outlined"] {
        let other = render(
            &spec(&format!("a {style} green square on a white background")).layout(2, TOY_SIZE),
            TOY_SIZE,
        );
        let changed = plain
            .iter()
            .zip(&other)
            .filter(|(x, y)| (*x - *y).abs() > 0.1)
            .count();
        assert!(changed > 20, "{style}: {changed}");
    }
}

#[test]
fn toy_tokenizer_gives_one_token_per_world_word() {
    let dir = tempfile::tempdir().unwrap();
    let words = vocabulary();
    write_toy_tokenizer(dir.path(), &words).unwrap();
    let tok = ClipTokenizer::from_folder(dir.path()).unwrap();
    for w in &words {
        let tokens = tok.tokens(w).unwrap();
        assert_eq!(tokens, vec![format!("{w}</w>")], "{w}");
    }
    let caption = "a striped red circle and a green star on a gray background";
    assert_eq!(
        tok.tokens(caption).unwrap().len(),
        caption.split(' ').count()
    );
    assert_eq!(tok.encode_padded(caption).unwrap().len(), 77);
}

#[test]
fn edit_pairs_accept_single_word_edits_and_refuse_the_rest() {
    let src = spec("a red circle and a green square on a white background");
    for (target, kind) in [
        (
            "a blue circle and a green square on a white background",
            EditKind::Color,
        ),
        (
            "a red circle and a green star on a white background",
            EditKind::Shape,
        ),
        (
            "a red circle and a dotted green square on a white background",
            EditKind::AddStyle,
        ),
        (
            "a red circle and a green square on a black background",
            EditKind::Background,
        ),
    ] {
        assert_eq!(
            EditPair::new(&src, &spec(target)).unwrap().kind,
            kind,
            "{target}"
        );
    }
    for (target, needle) in [
        (
            "a blue circle and a green star on a white background",
            "one word",
        ),
        ("a red circle on a white background", "number of objects"),
        (
            "a red circle and a green square on a white background",
            "same caption",
        ),
    ] {
        let err = EditPair::new(&src, &spec(target)).unwrap_err().to_string();
        assert!(err.contains(needle) && err.contains(target), "{err}");
    }
    let styled = spec("a striped red circle on a blue background");
    assert_eq!(
        EditPair::new(&styled, &spec("a dotted red circle on a blue background"))
            .unwrap()
            .kind,
        EditKind::Style
    );
    let p2p = EditPair::new(
        &src,
        &spec("a red circle and a dotted green square on a white background"),
    )
    .unwrap()
    .p2p();
    assert_eq!(
        (p2p.mode, p2p.blend_source.as_str()),
        (stylediff::EditMode::Refine, "square")
    );
}

#[test]
fn masks_cover_exactly_the_changed_pixels() {
    let src = spec("a red circle and a green square on a white background");
    let pair = EditPair::new(
        &src,
        &spec("a red circle and a blue square on a white background"),
    )
    .unwrap();
    let r = render_pair(&pair, 7);
    let square = silhouette(&pair.source.layout(7, TOY_SIZE), 1, TOY_SIZE);
    let circle = silhouette(&pair.source.layout(7, TOY_SIZE), 0, TOY_SIZE);
    assert!(r.mask.iter().filter(|m| **m).count() > 10);
    for i in 0..r.mask.len() {
        if r.mask[i] {
            assert!(
                square[i] > 0.0,
                "a colour edit changes only the edited object"
            );
        }
        assert!(
            !(r.mask[i] && circle[i] > 0.0),
            "the other object is untouched"
        );
        let same = (0..3).all(|c| r.source[i * 3 + c] == r.target[i * 3 + c]);
        assert_eq!(!same, r.mask[i]);
    }
}

#[test]
fn pairs_manifest_lists_every_case_with_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let cases = random_pairs(12, 3);
    assert!(cases.iter().all(|c| c.layout_seed >= HELD_OUT_LAYOUT_SEEDS));
    write_pairs(&cases, dir.path()).unwrap();
    let manifest = std::fs::read_to_string(dir.path().join("manifest.csv")).unwrap();
    let lines: Vec<&str> = manifest.lines().collect();
    assert_eq!(lines.len(), 13);
    assert!(lines[0].starts_with("case,source,target,edit_kind"));
    for line in &lines[1..] {
        for file in line.split(',').rev().take(3) {
            assert!(dir.path().join(file).is_file(), "{file}");
        }
    }
}

/// The checker reads renders back correctly, so it can judge generated images.
#[test]
fn attribute_checker_reads_renders_back() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (mut n, mut ok_bg, mut ok_color, mut ok_shape) = (0, 0, 0, 0);
    while n < 300 {
        let s = SceneSpec::random(&mut rng);
        if s.objects.len() != 1 {
            continue;
        }
        n += 1;
        let img = render(
            &s.layout(HELD_OUT_LAYOUT_SEEDS + n as u64, TOY_SIZE),
            TOY_SIZE,
        );
        let d = detect(&img, TOY_SIZE).expect("an object is found");
        ok_bg += (d.background == s.background) as usize;
        ok_color += (d.color == s.objects[0].color) as usize;
        ok_shape += (d.shape == s.objects[0].shape) as usize;
    }
    eprintln!(
        "checker on renders: background {ok_bg}/300, colour {ok_color}/300, shape {ok_shape}/300"
    );
    assert!(
        ok_bg >= 297 && ok_color >= 291 && ok_shape >= 285,
        "{ok_bg} {ok_color} {ok_shape}"
    );
    let _ = Shape::ALL;
    let _ = Style::ALL;
}

/// A speck of object colour away from the object (as decoders leave in corners) does not change the reading.
#[test]
fn attribute_checker_ignores_specks_away_from_the_object() {
    for caption in [
        "a blue square on a orange background",
        "a white star on a red background",
        "a outlined green triangle on a gray background",
    ] {
        let s = spec(caption);
        let mut img = render(&s.layout(HELD_OUT_LAYOUT_SEEDS + 3, TOY_SIZE), TOY_SIZE);
        let clean = detect(&img, TOY_SIZE).expect("an object is found");
        assert_eq!(clean.shape, s.objects[0].shape, "{caption}");
        let rgb = s.objects[0].color.rgb();
        for (x, y) in [
            (0, TOY_SIZE - 1),
            (TOY_SIZE - 1, 0),
            (TOY_SIZE - 1, TOY_SIZE - 1),
        ] {
            // Only where the render has background: the object itself stays as drawn.
            let i = (y * TOY_SIZE + x) * 3;
            let bg = s.background.rgb();
            if (0..3).all(|c| (img[i + c] - bg[c]).abs() < 1e-3) {
                img[i..i + 3].copy_from_slice(&rgb);
            }
        }
        let specked = detect(&img, TOY_SIZE).expect("an object is found");
        assert_eq!(specked, clean, "{caption}");
    }
}
