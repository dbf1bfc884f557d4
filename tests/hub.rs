//! Models named by Hugging Face hub id, read from a cache in the standard layout (built here from the tiny
//! pipeline: blobs, snapshots of symlinks, refs, two revisions), offline unless `--download` is given.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const ORG_NAME: &str = "test-org/tiny-sd";

/// A hub cache holding `ORG_NAME` at two revisions: `main` (the tiny pipeline as it is) and `v2` (its UNet's
/// output convolution scaled), plus a repository that has only its configs.
fn hub_cache(root: &Path) -> (PathBuf, String, String) {
    let cache = root.join("hub");
    let repo = cache.join("models--test-org--tiny-sd");
    let snapshot = |commit: &str, source: &Path| {
        let dir = repo.join("snapshots").join(commit);
        let mut stack = vec![source.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let rel = p.strip_prefix(source).unwrap();
                let bytes = std::fs::read(&p).unwrap();
                let blob_name =
                    stylediff::image_io::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
                let blob = repo.join("blobs").join(&blob_name);
                std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
                std::fs::write(&blob, &bytes).unwrap();
                let link = dir.join(rel);
                std::fs::create_dir_all(link.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(&blob, &link).unwrap();
            }
        }
    };
    let tiny = common::repo_path("tests/fixtures/sd1-tiny");
    let (main, v2) = (
        "0123456789abcdef0123456789abcdef01234567".to_string(),
        "fedcba9876543210fedcba9876543210fedcba98".to_string(),
    );
    snapshot(&main, &tiny);
    let changed = root.join("v2-source");
    common::copy_dir(&tiny, &changed);
    common::edit_weights(&changed.join("unet"), |t| {
        let w = t.get_mut("conv_out.weight").unwrap();
        *w = (w.clone() * 0.5).unwrap();
    });
    snapshot(&v2, &changed);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), &main).unwrap();
    std::fs::write(repo.join("refs/v2"), &v2).unwrap();
    // A repository whose weights were never fetched.
    let partial = cache.join("models--test-org--configs-only/snapshots/aaaa");
    for f in ["model_index.json", "unet/config.json", "vae/config.json"] {
        std::fs::create_dir_all(partial.join(f).parent().unwrap()).unwrap();
        std::fs::copy(tiny.join(f), partial.join(f)).unwrap();
    }
    std::fs::create_dir_all(cache.join("models--test-org--configs-only/refs")).unwrap();
    std::fs::write(
        cache.join("models--test-org--configs-only/refs/main"),
        "aaaa",
    )
    .unwrap();
    (cache, main, v2)
}

/// `generate` with the given model and environment: (success, stderr, final latent bytes).
fn generate(
    model: &str,
    env: &[(&str, &Path)],
    extra: &[&str],
    dir: &Path,
) -> (bool, String, Vec<u8>) {
    let out = dir.join("out.png");
    let lat = dir.join("lat.safetensors");
    let _ = std::fs::remove_file(&lat);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stylediff"));
    cmd.env_remove("HF_HUB_CACHE")
        .env_remove("HF_HOME")
        // Were anything to touch the network, it would fail here rather than reach a real host.
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("NO_PROXY", "127.0.0.1");
    for proxy in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        cmd.env_remove(proxy);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd
        .args([
            "generate",
            "--model",
            model,
            "--prompt",
            "a red circle",
            "--steps",
            "3",
        ])
        .args(["--seed", "4", "--out", out.to_str().unwrap()])
        .args(["--save-latents", lat.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).to_string(),
        std::fs::read(&lat).unwrap_or_default(),
    )
}

#[test]
fn hub_ids_resolve_in_the_cache_to_the_same_model_as_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (cache, main, _) = hub_cache(tmp.path());
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let tiny = common::repo_path("tests/fixtures/sd1-tiny");
    let (ok, err, from_folder) = generate(tiny.to_str().unwrap(), &[], &[], &work);
    assert!(ok, "{err}");

    let (ok, err, from_hub) = generate(ORG_NAME, &[("HF_HUB_CACHE", &cache)], &[], &work);
    assert!(ok, "{err}");
    assert_eq!(from_hub, from_folder, "a hub id gives the folder's latents");
    assert!(
        err.contains("model: test-org/tiny-sd (hub)"),
        "the model used is announced: {err}"
    );

    // HF_HOME/hub is the cache when HF_HUB_CACHE is unset.
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::symlink(&cache, home.join("hub")).unwrap();
    let (ok, err, via_home) = generate(ORG_NAME, &[("HF_HOME", &home)], &[], &work);
    assert!(ok, "{err}");
    assert_eq!(via_home, from_folder);

    // A revision by name (a ref) or by commit.
    let (ok, err, v2) = generate(
        &format!("{ORG_NAME}@v2"),
        &[("HF_HUB_CACHE", &cache)],
        &[],
        &work,
    );
    assert!(ok, "{err}");
    assert_ne!(v2, from_folder, "revision v2 is another model");
    let (ok, err, by_commit) = generate(
        &format!("{ORG_NAME}@{main}"),
        &[("HF_HUB_CACHE", &cache)],
        &[],
        &work,
    );
    assert!(ok, "{err}");
    assert_eq!(by_commit, from_folder);

    // inspect reads hub ids too.
    let o = Command::new(env!("CARGO_BIN_EXE_stylediff"))
        .env("HF_HUB_CACHE", &cache)
        .args(["inspect", "--model", ORG_NAME])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn missing_hub_files_are_listed_with_the_command_that_fetches_them_and_nothing_is_downloaded() {
    let tmp = tempfile::tempdir().unwrap();
    let (cache, _, _) = hub_cache(tmp.path());
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let env = [("HF_HUB_CACHE", cache.as_path())];

    let (ok, err, _) = generate("test-org/configs-only", &env, &[], &work);
    assert!(!ok);
    for needle in [
        "test-org/configs-only",
        "unet/diffusion_pytorch_model.safetensors",
        "tokenizer/vocab.json",
        "hf download test-org/configs-only",
        "--download",
    ] {
        assert!(err.contains(needle), "lacks {needle:?}: {err}");
    }
    assert!(
        !err.contains("127.0.0.1"),
        "no network without --download: {err}"
    );
    assert!(!work.join("out.png").exists());

    let (ok, err, _) = generate("test-org/not-fetched@v1", &env, &[], &work);
    assert!(
        !ok && err.contains("--revision v1") && err.contains("model_index.json"),
        "{err}"
    );

    // With --download it does try the hub (here an address where nothing listens), and says so.
    let (ok, err, _) = generate("test-org/configs-only", &env, &["--download"], &work);
    assert!(
        !ok && err.contains("downloading test-org/configs-only"),
        "{err}"
    );

    // Neither a folder nor a hub id.
    let (ok, err, _) = generate("no-such-folder", &env, &[], &work);
    assert!(!ok && err.contains("no such model folder"), "{err}");
}

#[test]
fn the_toy_model_warns_when_a_photo_is_not_a_toy_scene() {
    let tmp = tempfile::tempdir().unwrap();
    let photo = tmp.path().join("photo.png");
    image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 90]))
        .save(&photo)
        .unwrap();
    let scene = tmp.path().join("scene.png");
    let o = Command::new(env!("CARGO_BIN_EXE_stylediff"))
        .args([
            "toy",
            "render",
            "--caption",
            "a red circle on a blue background",
        ])
        .args(["--out", scene.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success());
    let invert = |image: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_stylediff"))
            .args(["invert", "--image", image.to_str().unwrap()])
            .args([
                "--prompt",
                "a red circle on a blue background",
                "--method",
                "ddim",
            ])
            .args([
                "--steps",
                "2",
                "--out",
                tmp.path().join("x.safetensors").to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let err = invert(&photo);
    assert!(
        err.contains("the bundled toy model") && err.contains("is not a toy scene"),
        "{err}"
    );
    assert!(err.contains("64x48") && err.contains("--model"), "{err}");
    assert!(!invert(&scene).contains("not a toy scene"));
}

/// A stand-in for the hub on a loopback port: the model-info API and `resolve` downloads (with ranges), serving
/// the tiny pipeline's files plus decoys stylediff must not fetch. Returns the base URL and the request log.
fn fake_hub(
    root: PathBuf,
    commit: &'static str,
    max_requests: usize,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = log.clone();
    let mut files: Vec<String> = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p.strip_prefix(&root).unwrap().to_string_lossy().to_string());
            }
        }
    }
    files.extend([
        "unet/diffusion_pytorch_model.bin".into(),
        "v1-5-pruned.ckpt".into(),
    ]);
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max_requests) {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range_start: Option<u64> = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range_start = v.trim().split('-').next().and_then(|s| s.parse().ok());
                }
            }
            seen.lock().unwrap().push(path.clone());
            let (status, headers, body): (&str, String, Vec<u8>) = if path
                .starts_with("/api/models/")
            {
                let siblings: Vec<serde_json::Value> = files
                    .iter()
                    .map(|f| serde_json::json!({ "rfilename": f }))
                    .collect();
                let json = serde_json::json!({ "sha": commit, "siblings": siblings }).to_string();
                (
                    "200 OK",
                    "Content-Type: application/json\r\n".into(),
                    json.into_bytes(),
                )
            } else if let Some(file) = path
                .split("/resolve/")
                .nth(1)
                .and_then(|r| r.split_once('/'))
                .map(|(_, f)| f)
            {
                match std::fs::read(root.join(file)) {
                    Ok(bytes) => {
                        let start = (range_start.unwrap_or(0) as usize).min(bytes.len());
                        let body = bytes[start..].to_vec();
                        let etag = stylediff::image_io::hex(
                            &<sha2::Sha256 as sha2::Digest>::digest(&bytes),
                        );
                        (
                            "206 Partial Content",
                            format!(
                                "x-repo-commit: {commit}\r\nETag: \"{etag}\"\r\nContent-Range: bytes {start}-{}/{}\r\n",
                                bytes.len().saturating_sub(1),
                                bytes.len()
                            ),
                            body,
                        )
                    }
                    Err(_) => ("404 Not Found", String::new(), b"not found".to_vec()),
                }
            } else {
                ("404 Not Found", String::new(), b"not found".to_vec())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(&body);
        }
    });
    (base, log)
}

#[test]
fn download_fetches_only_what_stylediff_reads_and_later_runs_are_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = common::repo_path("tests/fixtures/sd1-tiny");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let (_, _, from_folder) = generate(tiny.to_str().unwrap(), &[], &[], &work);
    let cache = tmp.path().join("cache");
    let (base, log) = fake_hub(
        tiny.clone(),
        "1111111111111111111111111111111111111111",
        200,
    );
    let env = |endpoint: &str| {
        [
            ("HF_HUB_CACHE", cache.clone()),
            ("HF_ENDPOINT", PathBuf::from(endpoint)),
        ]
    };
    let run = |extra: &[&str], endpoint: &str| {
        let env = env(endpoint);
        let env: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
        generate(ORG_NAME, &env, extra, &work)
    };
    let (ok, err, downloaded) = run(&["--download"], &base);
    assert!(ok, "{err}");
    assert_eq!(
        downloaded, from_folder,
        "the downloaded model is the folder's"
    );
    let requested = log.lock().unwrap().clone();
    assert!(
        requested
            .iter()
            .any(|r| r.contains("unet/diffusion_pytorch_model.safetensors")),
        "{requested:?}"
    );
    assert!(
        !requested
            .iter()
            .any(|r| r.ends_with(".bin") || r.ends_with(".ckpt")),
        "{requested:?}"
    );
    assert!(
        !requested.iter().any(|r| r.contains("tokenizer-json")),
        "only what is read: {requested:?}"
    );

    // Everything is in the cache now: the next run needs no --download and no hub.
    let (ok, err, offline) = run(&[], "http://127.0.0.1:9");
    assert!(ok, "{err}");
    assert_eq!(offline, from_folder);
}
