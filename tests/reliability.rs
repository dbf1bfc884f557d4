//! The bad-input corpus (docs/reliability.md): every case runs the real binary on the tiny pipeline and checks
//! its exit status, that the message names the problem, and that no input or earlier output changed (SHA-256 of
//! every file in the work folder and the model copy, before and after). A case that fails may write nothing.

mod common;

use common::{stylediff, text};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::Digest;

/// The work folder every case runs in: a photo, a valid inversion, earlier outputs, and a model copy.
struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
}

impl Fixture {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }
}

/// SHA-256 of every file under `root`, by path.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                let bytes = std::fs::read(&p).unwrap();
                out.insert(p, stylediff::image_io::hex(&sha2::Sha256::digest(&bytes)));
            }
        }
    }
    out
}

/// A raw rewrite of an inversion artifact: its tensors (dtype, shape, bytes) and its metadata JSON.
type RawTensors = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn rewrite_artifact(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut RawTensors, &mut serde_json::Value),
) {
    let bytes = std::fs::read(src).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta: serde_json::Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["stylediff"]).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: RawTensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors, &mut meta);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let header: std::collections::HashMap<String, String> =
        [("stylediff".to_string(), meta.to_string())].into();
    std::fs::write(dst, safetensors::serialize(views, Some(header)).unwrap()).unwrap();
}

/// CRC-32 (PNG's chunk checksum).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG's bytes with its header rewritten to declare `w` x `h` pixels (its data stays small).
fn declare_size(png: &Path, w: u32, h: u32) -> Vec<u8> {
    let mut bytes = std::fs::read(png).unwrap();
    assert_eq!(&bytes[12..16], b"IHDR");
    bytes[16..20].copy_from_slice(&w.to_be_bytes());
    bytes[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A model copy whose `component` weights `edit` changes.
fn broken_model(
    fx: &Fixture,
    name: &str,
    component: &str,
    edit: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) {
    let dst = fx.dir.path().join(name);
    common::copy_dir(&fx.model, &dst);
    common::edit_weights(&dst.join(component), edit);
}

fn setup() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    common::copy_dir(&common::repo_path("tests/fixtures/sd1-tiny"), &model);
    let fx = Fixture {
        dir,
        model: model.clone(),
    };
    let p = |n: &str| fx.dir.path().join(n);
    // The photo, and the same PNG bytes under a name an artifact could take.
    let photo = image::RgbImage::from_fn(48, 40, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 6) as u8, ((x + y) * 3) as u8])
    });
    photo.save(p("photo.png")).unwrap();
    std::fs::copy(p("photo.png"), p("photo-as.safetensors")).unwrap();
    std::fs::hard_link(p("photo-as.safetensors"), p("photo-hard.safetensors")).unwrap();
    std::fs::write(p("earlier.png"), b"an earlier output").unwrap();
    // CSVs in the authors' layout (image paths relative to the CSV).
    let header = "case_number,prompt,image_path,target,blend_word,tau_c\n";
    for (name, rows) in [
        ("empty.csv", ""),
        ("good.csv", "1,a red circle,photo.png,,,\n"),
        (
            "escape.csv",
            "x/../../../escaped,a red circle,photo.png,,,\n",
        ),
        (
            "dup.csv",
            "1,a red circle,photo.png,,,\n1,a red circle,photo.png,,,\n",
        ),
        (
            "tau.csv",
            "1,a red circle,photo.png,a green circle,,[1.5]\n",
        ),
        (
            "word.csv",
            "1,a red circle,photo.png,a green circle,\"[('square',),('green',)]\",\n",
        ),
        ("nophoto.csv", "1,a red circle,gone.png,,,\n"),
        ("results.csv", "1,a red circle,photo.png,,,\n"),
        ("long.csv", &format!("1,{},photo.png,,,\n", long_prompt())),
    ] {
        std::fs::write(p(name), format!("{header}{rows}")).unwrap();
    }
    std::fs::write(p("notes.txt"), b"not an image at all").unwrap();
    std::fs::write(p("empty.png"), b"").unwrap();
    std::fs::create_dir(p("folder.png")).unwrap();
    // A JPEG cut short, and a PNG whose header declares 16000 x 16000 pixels.
    let mut jpeg = Vec::new();
    image::DynamicImage::ImageRgb8(photo.clone())
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    std::fs::write(p("cut.jpg"), &jpeg[..jpeg.len() * 2 / 3]).unwrap();
    std::fs::write(p("whole.jpg"), &jpeg).unwrap();
    let big = declare_size(&p("photo.png"), 16000, 16000);
    std::fs::write(p("huge.png"), &big).unwrap();
    // A valid inversion (StyleDiffusion, 2 steps) and a DDIM one, made by the CLI.
    for (name, method) in [("inv", "stylediffusion"), ("ddim", "ddim")] {
        let o = stylediff(&args(&[
            "invert",
            "--model",
            model.to_str().unwrap(),
            "--image",
            &fx.path("photo.png"),
            "--prompt",
            "a red circle",
            "--method",
            method,
            "--steps",
            "2",
            "--inner-steps",
            "1",
            "--out",
            &fx.path(&format!("{name}.safetensors")),
        ]));
        assert!(o.status.success(), "{}", text(&o));
    }
    std::os::unix::fs::symlink(p("inv.safetensors"), p("inv-link.png")).unwrap();
    let inv = p("inv.safetensors");
    rewrite_artifact(&inv, &p("bad-zt.safetensors"), |t, _| {
        t.insert(
            "z_t".into(),
            (
                safetensors::Dtype::F32,
                vec![1, 4, 2, 2],
                f32_bytes(&[0.5; 16]),
            ),
        );
    });
    rewrite_artifact(&inv, &p("no-values.safetensors"), |t, _| {
        t.retain(|k, _| !k.starts_with("values."));
    });
    rewrite_artifact(&inv, &p("bad-value.safetensors"), |t, _| {
        t.insert(
            "values.0001".into(),
            (safetensors::Dtype::F32, vec![3, 5], f32_bytes(&[0.1; 15])),
        );
    });
    rewrite_artifact(&inv, &p("nan-zt.safetensors"), |t, _| {
        let (_, shape, bytes) = t.get_mut("z_t").unwrap();
        let n = shape.iter().product::<usize>();
        let mut v = vec![0.25f32; n];
        v[3] = f32::NAN;
        *bytes = f32_bytes(&v);
    });
    rewrite_artifact(&inv, &p("extra.safetensors"), |t, _| {
        t.insert(
            "secret".into(),
            (safetensors::Dtype::F32, vec![1], f32_bytes(&[1.0])),
        );
    });
    rewrite_artifact(&inv, &p("f16.safetensors"), |t, _| {
        let (_, shape, _) = t["z_t"].clone();
        let n = shape.iter().product::<usize>();
        t.insert(
            "z_t".into(),
            (safetensors::Dtype::F16, shape, vec![0u8; 2 * n]),
        );
    });
    rewrite_artifact(&inv, &p("big-guidance.safetensors"), |_, m| {
        m["settings"]["guidance"] = serde_json::json!(1e9);
    });
    rewrite_artifact(&inv, &p("more-steps.safetensors"), |_, m| {
        m["settings"]["steps"] = serde_json::json!(3);
    });
    rewrite_artifact(
        &p("ddim.safetensors"),
        &p("ddim-values.safetensors"),
        |t, _| {
            let v = (
                safetensors::Dtype::F32,
                vec![154, 32],
                f32_bytes(&[0.0; 154 * 32]),
            );
            t.extend([
                ("values.0000".to_string(), v.clone()),
                ("values.0001".to_string(), v),
            ]);
        },
    );
    std::fs::write(
        p("random.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!garbage!",
    )
    .unwrap();
    // Models with NaN weights, and with finite but overflowing ones.
    broken_model(&fx, "nan-unet", "unet", |tensors| {
        let t = tensors.get_mut("conv_in.weight").unwrap();
        let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v[0] = f32::NAN;
        *t = candle_core::Tensor::from_vec(v, t.dims(), t.device()).unwrap();
    });
    // Finite weights near f32's largest value: every output of the VAE's last convolutions overflows.
    broken_model(&fx, "huge-vae", "vae", |tensors| {
        for name in ["decoder.conv_out.weight", "encoder.conv_out.weight"] {
            let t = tensors.get_mut(name).unwrap();
            *t = (t.ones_like().unwrap() * 3e38).unwrap();
        }
    });
    fx
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// `base` with each `--flag value` pair of `extra` replacing the same flag's value, or appended.
fn with(mut base: Vec<String>, extra: &[&str]) -> Vec<String> {
    for pair in extra.chunks(2) {
        match base.iter().position(|a| a == pair[0]) {
            Some(i) => base[i + 1] = pair[1].to_string(),
            None => base.extend(args(pair)),
        }
    }
    base
}

/// How a case must end.
enum Expect {
    /// Exit status non-zero, every needle in the output, nothing in the work folder created or changed.
    Refused(&'static [&'static str]),
    /// Exit status 0 and `check` holds; nothing that existed before changed.
    Works(fn(&Fixture, &str)),
}

struct Case {
    name: &'static str,
    args: Vec<String>,
    expect: Expect,
}

fn long_prompt() -> String {
    let mut words = vec!["a red circle"];
    words.extend(std::iter::repeat_n("on a blue background", 20));
    words.join(" ")
}

fn cases(fx: &Fixture) -> Vec<Case> {
    let m = fx.model.to_str().unwrap().to_string();
    let f = |n: &str| fx.path(n);
    let run = |extra: &[&str]| {
        let base = args(&[
            "run",
            "--model",
            &m,
            "--image",
            &f("photo.png"),
            "--prompt",
            "a red circle",
            "--target",
            "a green circle",
            "--steps",
            "2",
            "--inner-steps",
            "1",
            "--out",
            &f("new-out.png"),
        ]);
        with(base, extra)
    };
    let invert = |extra: &[&str]| {
        let base = args(&[
            "invert",
            "--model",
            &m,
            "--image",
            &f("photo.png"),
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--inner-steps",
            "1",
            "--out",
            &f("new.safetensors"),
        ]);
        with(base, extra)
    };
    let edit = |inv: &str, extra: &[&str]| {
        let base = args(&[
            "edit",
            "--model",
            &m,
            "--inversion",
            &f(inv),
            "--target",
            "a green circle",
            "--out",
            &f("new-edit.png"),
        ]);
        with(base, extra)
    };
    let generate = |model: &str, extra: &[&str]| {
        let base = args(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--out",
            &f("new-gen.png"),
        ]);
        with(base, extra)
    };
    let batch = |extra: &[&str]| {
        let base = args(&[
            "batch",
            "--model",
            &m,
            "--csv",
            &f("good.csv"),
            "--out-dir",
            &f("batch-out"),
            "--steps",
            "2",
            "--inner-steps",
            "1",
        ]);
        with(base, extra)
    };
    let long = long_prompt();
    let nan_unet = f("nan-unet");
    let huge_vae = f("huge-vae");
    let c = |name, args, expect| Case { name, args, expect };
    use Expect::*;
    vec![
        // Inputs and earlier outputs are never overwritten; outputs never collide.
        c(
            "run: --save-inversion is the photo",
            run(&[
                "--image",
                &f("photo-as.safetensors"),
                "--save-inversion",
                &f("photo-as.safetensors"),
            ]),
            Refused(&["would overwrite the input image"]),
        ),
        c(
            "invert: --out is the photo",
            invert(&[
                "--image",
                &f("photo-as.safetensors"),
                "--out",
                &f("photo-as.safetensors"),
            ]),
            Refused(&["would overwrite the input image"]),
        ),
        c(
            "invert: --out is a hard link to the photo",
            invert(&[
                "--image",
                &f("photo-as.safetensors"),
                "--out",
                &f("photo-hard.safetensors"),
            ]),
            Refused(&["would overwrite the input image"]),
        ),
        c(
            "invert: --out names JSON (the sidecar's kind)",
            invert(&["--out", &f("inv.json")]),
            Refused(&["*.safetensors"]),
        ),
        c(
            "run: --out and --grid are one file",
            run(&["--out", &f("same.png"), "--grid", &f("same.png")]),
            Refused(&["same file"]),
        ),
        c(
            "run: --grid is --out spelt differently",
            run(&[
                "--out",
                &f("same.png"),
                "--grid",
                &format!("{}/sub/../same.png", fx.dir.path().display()),
            ]),
            Refused(&["same file"]),
        ),
        c(
            "run: --grid onto the photo",
            run(&["--grid", &f("photo.png")]),
            Refused(&["would overwrite the input image"]),
        ),
        c(
            "edit: --out is a symlink to the inversion",
            edit("inv.safetensors", &["--out", &f("inv-link.png")]),
            Refused(&["would overwrite the inversion"]),
        ),
        c(
            "edit: --grid onto the inversion's metadata",
            edit("inv.safetensors", &["--grid", &f("inv.safetensors.json")]),
            Refused(&[".json", ".png"]),
        ),
        c(
            "edit: --out inside the model folder",
            edit("inv.safetensors", &["--out", &format!("{m}/unet/edit.png")]),
            Refused(&["inside the model folder"]),
        ),
        c(
            "generate: --save-latents onto --out",
            generate(&m, &["--out", &f("x.png"), "--save-latents", &f("x.png")]),
            Refused(&["*.safetensors"]),
        ),
        c(
            "generate: --save-latents onto the initial latent",
            generate(
                &m,
                &[
                    "--latents",
                    &f("lat.safetensors"),
                    "--save-latents",
                    &f("lat.safetensors"),
                ],
            ),
            Refused(&["would overwrite the initial latent"]),
        ),
        c(
            "generate: --out is an existing folder",
            generate(&m, &["--out", &f("folder.png")]),
            Refused(&["existing folder"]),
        ),
        c(
            "generate: --out below a file",
            generate(&m, &["--out", &format!("{}/x.png", f("earlier.png"))]),
            Refused(&["is a file, not a folder"]),
        ),
        c(
            "attention: --out is a symlink to the inversion",
            args(&[
                "attention",
                "--model",
                &m,
                "--inversion",
                &f("inv.safetensors"),
                "--out",
                &f("inv-link.png"),
            ]),
            Refused(&["would overwrite the inversion"]),
        ),
        // batch: case numbers are safe and unique; every case is checked before any runs.
        c(
            "batch: a case number that climbs out of --out-dir",
            batch(&["--csv", &f("escape.csv")]),
            Refused(&["escape.csv", "x/../../../escaped", "folder names"]),
        ),
        c(
            "batch: a repeated case number",
            batch(&["--csv", &f("dup.csv")]),
            Refused(&["dup.csv", "repeats row 2"]),
        ),
        c(
            "batch: a CSV without cases",
            batch(&["--csv", &f("empty.csv")]),
            Refused(&["empty.csv", "no cases"]),
        ),
        c(
            "batch: a tau out of range",
            batch(&["--csv", &f("tau.csv")]),
            Refused(&["case 1", "tau_c", "1.5", "nothing was run"]),
        ),
        c(
            "batch: a blend word not in the prompt",
            batch(&["--csv", &f("word.csv")]),
            Refused(&["case 1", "square", "nothing was run"]),
        ),
        c(
            "batch: a missing photo",
            batch(&["--csv", &f("nophoto.csv")]),
            Refused(&["case 1", "gone.png", "nothing was run"]),
        ),
        c(
            "batch: a prompt over 77 tokens",
            batch(&["--csv", &f("long.csv")]),
            Refused(&["case 1", "would be cut"]),
        ),
        c(
            "batch: results.csv would replace the CSV",
            batch(&["--csv", &f("results.csv"), "--out-dir", &f("")]),
            Refused(&["would overwrite the CSV"]),
        ),
        c(
            "batch: --out-dir inside the model folder",
            batch(&["--out-dir", &format!("{m}/runs")]),
            Refused(&["inside the model folder"]),
        ),
        c(
            "batch: --out-dir is a file",
            batch(&["--out-dir", &f("earlier.png")]),
            Refused(&["is a file, not a folder"]),
        ),
        c(
            "batch: --guidance NaN",
            batch(&["--guidance", "NaN"]),
            Refused(&["guidance", "NaN"]),
        ),
        c(
            "generate: --device cuda in a CPU build",
            generate(&m, &["--device", "cuda"]),
            Refused(&["cuda", "--features cuda"]),
        ),
        // Output formats follow the extension.
        c(
            "generate: --out .gif",
            generate(&m, &["--out", &f("x.gif")]),
            Refused(&[".gif", ".png"]),
        ),
        c(
            "generate: --out without an extension",
            generate(&m, &["--out", &f("x")]),
            Refused(&["extension"]),
        ),
        c(
            "edit: --out .bmp",
            edit("inv.safetensors", &["--out", &f("x.bmp")]),
            Refused(&[".bmp"]),
        ),
        c(
            "generate: --out .jpg writes a JPEG",
            generate(&m, &["--out", &f("gen.jpg")]),
            Works(|fx, _| {
                assert_eq!(
                    &std::fs::read(fx.path("gen.jpg")).unwrap()[..2],
                    &[0xFF, 0xD8]
                );
            }),
        ),
        c(
            "edit: --out .webp writes a WebP",
            edit("inv.safetensors", &["--out", &f("edit.webp")]),
            Works(|fx, _| {
                assert_eq!(&std::fs::read(fx.path("edit.webp")).unwrap()[..4], b"RIFF");
            }),
        ),
        // Numbers: finite and in range, or refused with their name.
        c(
            "run: --guidance NaN",
            run(&["--guidance", "NaN"]),
            Refused(&["guidance", "NaN"]),
        ),
        c(
            "run: --guidance inf",
            run(&["--guidance", "inf"]),
            Refused(&["guidance", "inf"]),
        ),
        c(
            "run: --guidance -5",
            run(&["--guidance", "-5"]),
            Refused(&["guidance", "-5", "between 0 and 100"]),
        ),
        c(
            "run: --attention-weight NaN",
            run(&["--attention-weight", "NaN"]),
            Refused(&["attention weight", "NaN"]),
        ),
        c(
            "run: --attention-weight -1",
            run(&["--attention-weight", "-1"]),
            Refused(&["attention weight"]),
        ),
        c(
            "run: --tau-v 1.5",
            run(&["--tau-v", "1.5"]),
            Refused(&["tau_v", "1.5"]),
        ),
        c(
            "run: --tau-c NaN",
            run(&["--tau-c", "NaN"]),
            Refused(&["tau_c", "NaN"]),
        ),
        c(
            "run: --tau-u -0.5",
            run(&["--tau-u", "-0.5"]),
            Refused(&["tau_u", "-0.5"]),
        ),
        c(
            "run: --reweight factor NaN",
            run(&["--reweight", "green=NaN"]),
            Refused(&["reweight", "green", "NaN"]),
        ),
        c(
            "run: --reweight factor not a number",
            run(&["--reweight", "green=lots"]),
            Refused(&["--reweight", "not a number"]),
        ),
        c(
            "run: --cross-word fraction 2",
            run(&["--cross-word", "green=2"]),
            Refused(&["cross", "green", "2"]),
        ),
        c(
            "invert: --inner-steps 100000",
            invert(&["--inner-steps", "100000"]),
            Refused(&["inner steps", "100000", "1000"]),
        ),
        c(
            "invert: --steps 0",
            invert(&["--steps", "0"]),
            Refused(&["steps", "0"]),
        ),
        c(
            "invert: --steps 1000 (past the schedule)",
            invert(&["--steps", "1000"]),
            Refused(&["steps", "between 1 and 999"]),
        ),
        c(
            "generate: --guidance NaN",
            generate(&m, &["--guidance", "NaN"]),
            Refused(&["guidance", "NaN"]),
        ),
        c(
            "generate: --width 20000",
            generate(&m, &["--width", "20000", "--height", "20000"]),
            Refused(&["width", "20000", "2048"]),
        ),
        c(
            "generate: 2048x2048 needs more memory than the machine has",
            generate(&m, &["--width", "2048", "--height", "2048"]),
            Refused(&["needs about", "GiB", "free"]),
        ),
        c(
            "generate: --width 30",
            generate(&m, &["--width", "30"]),
            Refused(&["width", "30", "multiple of"]),
        ),
        c(
            "generate: --steps 0",
            generate(&m, &["--steps", "0"]),
            Refused(&["steps", "0"]),
        ),
        c(
            "toy eval: --n 0",
            args(&["toy", "eval", "--n", "0", "--out-dir", &f("eval")]),
            Refused(&["n", "0", "between 1"]),
        ),
        c(
            "toy pairs: --n 0",
            args(&["toy", "pairs", "--n", "0", "--out-dir", &f("pairs")]),
            Refused(&["between 1"]),
        ),
        c(
            "bench: --tau-v 2",
            args(&["bench", "--tau-v", "2", "--out-dir", &f("bench")]),
            Refused(&["tau_v", "2"]),
        ),
        c(
            "bench: unknown method",
            args(&["bench", "--methods", "ddim,magic", "--out-dir", &f("bench")]),
            Refused(&["magic"]),
        ),
        // Artifacts: every tensor checked against the model and the method.
        c(
            "edit: z_t of the wrong shape",
            edit("bad-zt.safetensors", &[]),
            Refused(&["z_t", "[1, 4, 2, 2]", "[1, 4, 8, 8]"]),
        ),
        c(
            "edit: StyleDiffusion values removed",
            edit("no-values.safetensors", &[]),
            Refused(&["values", "missing"]),
        ),
        c(
            "edit: one value tensor mis-shaped",
            edit("bad-value.safetensors", &[]),
            Refused(&["values.0001", "[3, 5]"]),
        ),
        c(
            "edit: NaN in z_t",
            edit("nan-zt.safetensors", &[]),
            Refused(&["z_t", "NaN"]),
        ),
        c(
            "edit: an unexpected tensor",
            edit("extra.safetensors", &[]),
            Refused(&["unexpected tensor", "secret"]),
        ),
        c(
            "edit: an f16 tensor",
            edit("f16.safetensors", &[]),
            Refused(&["z_t", "F16"]),
        ),
        c(
            "edit: metadata guidance out of range",
            edit("big-guidance.safetensors", &[]),
            Refused(&["guidance", "1000000000"]),
        ),
        c(
            "edit: metadata steps without their tensors",
            edit("more-steps.safetensors", &[]),
            Refused(&["values.0002", "missing"]),
        ),
        c(
            "edit: a DDIM inversion holding values",
            edit("ddim-values.safetensors", &[]),
            Refused(&["values", "ddim"]),
        ),
        c(
            "edit: not a safetensors file",
            edit("random.safetensors", &[]),
            Refused(&["random.safetensors", "safetensors"]),
        ),
        c(
            "attention: z_t of the wrong shape",
            args(&[
                "attention",
                "--model",
                &m,
                "--inversion",
                &f("bad-zt.safetensors"),
                "--out",
                &f("maps.png"),
            ]),
            Refused(&["z_t", "[1, 4, 2, 2]"]),
        ),
        // Weights: NaN refused at load and reported by inspect; a result that overflows is an error, not an image.
        c(
            "generate: NaN in the UNet's weights",
            generate(&nan_unet, &[]),
            Refused(&["NaN", "unet"]),
        ),
        c(
            "inspect: NaN in the UNet's weights",
            args(&["inspect", "--model", &nan_unet]),
            Refused(&["NaN", "unet"]),
        ),
        c(
            "run: NaN in the UNet's weights",
            run(&["--model", &nan_unet]),
            Refused(&["NaN"]),
        ),
        c(
            "generate: weights that overflow give no image",
            generate(&huge_vae, &[]),
            Refused(&["NaN or infinite"]),
        ),
        c(
            "invert: weights that overflow give no artifact",
            invert(&["--model", &huge_vae]),
            Refused(&["NaN or infinite"]),
        ),
        // Prompts: past the text encoder's 77 tokens is an error naming the cut words; words split on any space.
        c(
            "run: target prompt over 77 tokens",
            run(&["--target", &long]),
            Refused(&["tokens", "77", "would be cut", "background"]),
        ),
        c(
            "invert: prompt over 77 tokens",
            invert(&["--prompt", &long]),
            Refused(&["tokens", "would be cut"]),
        ),
        c(
            "generate: prompt over 77 tokens",
            generate(&m, &["--prompt", &long]),
            Refused(&["would be cut"]),
        ),
        c(
            "run: blend word not in the prompt",
            run(&["--blend", "square,green"]),
            Refused(&["square", "a red circle"]),
        ),
        c(
            "run: reweight word not in the target",
            run(&["--reweight", "tiger=2"]),
            Refused(&["tiger", "a green circle"]),
        ),
        c(
            "run: empty target",
            run(&["--target", "  "]),
            Refused(&["target", "empty"]),
        ),
        c(
            "run: --mode unknown",
            run(&["--mode", "swap"]),
            Refused(&["swap", "replace"]),
        ),
        c(
            "run: a double space in the prompt still replaces word for word",
            run(&[
                "--prompt",
                "a red  circle",
                "--blend",
                "red,green",
                "--out",
                &f("spaced.png"),
            ]),
            Works(|fx, _| {
                assert!(Path::new(&fx.path("spaced.png")).is_file());
            }),
        ),
        // Photos: decodable, within limits, whole.
        c(
            "invert: the photo is a text file",
            invert(&["--image", &f("notes.txt")]),
            Refused(&["notes.txt", "decode"]),
        ),
        c(
            "invert: the photo is empty",
            invert(&["--image", &f("empty.png")]),
            Refused(&["empty.png"]),
        ),
        c(
            "invert: the photo is missing",
            invert(&["--image", &f("missing.png")]),
            Refused(&["missing.png"]),
        ),
        c(
            "invert: a PNG declaring 16000x16000",
            invert(&["--image", &f("huge.png")]),
            Refused(&["huge.png", "16384"]),
        ),
        c(
            "invert: a truncated JPEG",
            invert(&["--image", &f("cut.jpg")]),
            Refused(&["cut.jpg", "truncated"]),
        ),
        c(
            "invert: a whole JPEG works",
            invert(&["--image", &f("whole.jpg"), "--out", &f("jpeg.safetensors")]),
            Works(|fx, _| {
                assert!(
                    Path::new(&fx.path("jpeg.safetensors.json")).is_file(),
                    "the sidecar is <name>.safetensors.json"
                );
            }),
        ),
        // Errors are printed once, clearly.
        c(
            "edit: a missing inversion names its path once",
            edit("gone.safetensors", &[]),
            Refused(&["gone.safetensors"]),
        ),
    ]
}

#[test]
fn the_bad_input_corpus_is_refused_clearly_and_nothing_is_lost() {
    let fx = setup();
    // An initial latent for the `--latents` cases.
    stylediff::util::save_tensors(
        &fx.dir.path().join("lat.safetensors"),
        &[(
            "latents",
            &candle_core::Tensor::zeros(
                (1, 4, 8, 8),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap(),
        )],
    )
    .unwrap();
    let all = cases(&fx);
    assert!(all.len() >= 60, "{} cases", all.len());
    let mut failures = Vec::new();
    for case in &all {
        let before = snapshot(fx.dir.path());
        let o = stylediff(&case.args);
        let out = text(&o);
        let after = snapshot(fx.dir.path());
        let changed: Vec<&PathBuf> = before
            .iter()
            .filter(|(p, h)| after.get(*p) != Some(*h))
            .map(|(p, _)| p)
            .collect();
        if !changed.is_empty() {
            failures.push(format!("{}: changed or removed {changed:?}", case.name));
        }
        if out.contains("panicked") || o.status.code().is_none() {
            failures.push(format!("{}: crashed ({:?}): {out}", case.name, o.status));
            continue;
        }
        match &case.expect {
            Expect::Refused(needles) => {
                if o.status.success() {
                    failures.push(format!("{}: accepted (exit 0): {out}", case.name));
                }
                let created: Vec<&PathBuf> =
                    after.keys().filter(|p| !before.contains_key(*p)).collect();
                if !created.is_empty() {
                    failures.push(format!("{}: wrote {created:?} though it failed", case.name));
                }
                for n in needles.iter() {
                    if !out.to_lowercase().contains(&n.to_lowercase()) {
                        failures.push(format!("{}: message lacks {n:?}: {out}", case.name));
                    }
                }
                if out.contains("error: unexpected argument") {
                    failures.push(format!("{}: clap misread a value: {out}", case.name));
                }
                let first_line = out.lines().find(|l| l.starts_with("error:")).unwrap_or("");
                if first_line.matches("(os error").count() > 1 {
                    failures.push(format!(
                        "{}: OS error printed twice: {first_line}",
                        case.name
                    ));
                }
            }
            Expect::Works(check) => {
                if !o.status.success() {
                    failures.push(format!("{}: failed: {out}", case.name));
                } else {
                    check(&fx, &out);
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases misbehaved:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}
