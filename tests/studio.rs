//! The studio's HTTP API against a real `stylediff serve` on a free loopback port, on the bundled toy model.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const PROMPT: &str = "a red circle on a blue background";

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(data: &std::path::Path, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stylediff"))
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(data)
        .args(extra)
        .env_remove("STYLEDIFF_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .split('#')
        .next()
        .unwrap()
        .to_string();
    Server { child, url }
}

/// (status, body) of a request, whatever the status.
fn call(req: ureq::Request, body: Option<(&str, Vec<u8>)>) -> (u16, Vec<u8>) {
    let result = match body {
        Some((content_type, bytes)) => req.set("Content-Type", content_type).send_bytes(&bytes),
        None => req.call(),
    };
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let status = response.status();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut bytes).unwrap();
    (status, bytes)
}

/// The status of a POST whose reply may come before the whole body is sent (an upload over the limit): the body
/// is written from another thread while this one reads, so the reply is read before the server's close can reset
/// the connection (an HTTP client that writes first and reads after loses that race now and then).
fn post_reading_early_reply(s: &Server, path: &str, content_type: &str, body: &[u8]) -> u16 {
    use std::io::{BufRead, Write};
    let authority = s.url.trim_start_matches("http://").trim_end_matches('/');
    let stream = std::net::TcpStream::connect(authority).expect("connects");
    let mut writer = stream.try_clone().unwrap();
    let request = format!(
        "POST /{path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let body = body.to_vec();
    // A write error is the server closing early, which is what is being tested; the status line tells.
    let sender = std::thread::spawn(move || {
        let _ = writer
            .write_all(request.as_bytes())
            .and_then(|()| writer.write_all(&body));
    });
    let mut status_line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut status_line)
        .expect("a reply");
    sender.join().unwrap();
    status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {status_line:?}"))
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(bytes)))
}

fn get(s: &Server, path: &str) -> (u16, Vec<u8>) {
    call(ureq::get(&format!("{}{path}", s.url)), None)
}

fn post_json(s: &Server, path: &str, body: Value) -> (u16, Value) {
    let (status, bytes) = call(
        ureq::post(&format!("{}{path}", s.url)),
        Some(("application/json", body.to_string().into_bytes())),
    );
    (status, json_of(&bytes))
}

/// A multipart form of text fields and the image's bytes.
fn form(fields: &[(&str, &str)], image: &[u8]) -> (String, Vec<u8>) {
    let boundary = "stylediff-test-boundary";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .bytes(),
        );
    }
    body.extend(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.png\"\r\nContent-Type: image/png\r\n\r\n")
            .bytes(),
    );
    body.extend(image);
    body.extend(format!("\r\n--{boundary}--\r\n").bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn start_inversion(s: &Server, image: &[u8], fields: &[(&str, &str)]) -> (u16, Value) {
    let (content_type, body) = form(fields, image);
    let (status, bytes) = call(
        ureq::post(&format!("{}api/inversions", s.url)),
        Some((&content_type, body)),
    );
    (status, json_of(&bytes))
}

fn scene(s: &Server) -> Vec<u8> {
    let (status, png) = call(
        ureq::post(&format!("{}api/toy-scene", s.url)),
        Some((
            "application/json",
            json!({ "caption": PROMPT }).to_string().into_bytes(),
        )),
    );
    assert_eq!(status, 200);
    png
}

/// Polls a job to its end; returns its last view and every event in order.
fn finish(s: &Server, job: &str) -> (Value, Vec<Value>) {
    let start = Instant::now();
    let mut since = 0;
    let mut events = Vec::new();
    loop {
        let (status, bytes) = get(s, &format!("api/jobs/{job}?since={since}"));
        assert_eq!(status, 200);
        let v = json_of(&bytes);
        events.extend(v["events"].as_array().unwrap().iter().cloned());
        since = v["next"].as_u64().unwrap() as usize;
        if ["done", "failed", "cancelled"].contains(&v["status"].as_str().unwrap()) {
            return (v, events);
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "job {job} did not end"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn job_status(s: &Server, job: &str) -> Value {
    json_of(&get(s, &format!("api/jobs/{job}?since=100000")).1)
}

#[test]
fn invert_edit_and_maps_with_progress_in_order_and_a_restart_keeps_them() {
    let data = tempfile::tempdir().unwrap();
    let s = serve(data.path(), &[]);
    let info = json_of(&get(&s, "api/info").1);
    assert_eq!(info["toy"], true);
    assert_eq!(info["native_size"], 32);
    let (_, page) = get(&s, "");
    assert!(String::from_utf8_lossy(&page).contains("stylediff studio"));

    let png = scene(&s);
    let (status, r) = start_inversion(
        &s,
        &png,
        &[("prompt", PROMPT), ("steps", "4"), ("inner_steps", "2")],
    );
    assert_eq!(status, 202, "{r}");
    let (v, events) = finish(&s, r["job"].as_str().unwrap());
    assert_eq!(v["status"], "done", "{v}");
    let inversion = v["result"]["inversion"].as_str().unwrap().to_string();
    // Progress: DDIM inversion's steps, then the optimisation's, then the reconstruction's, each in order.
    let phases: Vec<&str> = events
        .iter()
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    let first = |p| phases.iter().position(|x| *x == p).unwrap();
    let last = |p| phases.iter().rposition(|x| *x == p).unwrap();
    assert!(
        last("ddim-inversion") < first("optimising")
            && last("optimising") < first("reconstructing")
    );
    let ddim: Vec<u64> = events
        .iter()
        .filter(|e| e["phase"] == "ddim-inversion")
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(ddim, vec![1, 2, 3, 4]);

    let (status, r) = post_json(
        &s,
        "api/edits",
        json!({ "inversion": inversion, "target": "a green circle on a blue background",
                "blend": [["circle"], ["circle"]], "tau_v": 0.4 }),
    );
    assert_eq!(status, 202, "{r}");
    let (v, _) = finish(&s, r["job"].as_str().unwrap());
    assert_eq!(v["status"], "done", "{v}");
    let edit = v["result"]["edit"].as_str().unwrap().to_string();
    let (status, png) = get(&s, &format!("api/inversions/{inversion}/{edit}.png"));
    assert_eq!(status, 200);
    let saved = data.path().join("download.png");
    std::fs::write(&saved, &png).unwrap();
    let record = stylediff::util::read_image_settings(&saved)
        .unwrap()
        .unwrap();
    assert_eq!(
        record["target_prompt"],
        "a green circle on a blue background"
    );
    assert_eq!(record["edit"]["tau_v"], 0.4);

    let (status, r) = post_json(&s, "api/maps", json!({ "inversion": inversion }));
    assert_eq!(status, 202);
    let (v, _) = finish(&s, r["job"].as_str().unwrap());
    let tokens = v["result"]["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 9, "<start>, seven words, <end>");
    let grid = v["result"]["grid"].as_array().unwrap();
    let cells = grid[0].as_u64().unwrap() * grid[1].as_u64().unwrap();
    assert_eq!(tokens[3]["map"].as_array().unwrap().len() as u64, cells);

    // A restart lists the inversion and its edit, and edits it again.
    drop(s);
    let s = serve(data.path(), &[]);
    let list = json_of(&get(&s, "api/inversions").1);
    assert_eq!(list[0]["id"], inversion.as_str());
    assert_eq!(list[0]["edits"][0]["id"], edit.as_str());
    let (status, r) = post_json(
        &s,
        "api/edits",
        json!({ "inversion": inversion, "target": "a red square on a blue background" }),
    );
    assert_eq!(status, 202, "{r}");
    assert_eq!(finish(&s, r["job"].as_str().unwrap()).0["status"], "done");
    // The CLI reads what the studio keeps.
    let artifact = data.path().join(&inversion).join("inversion.safetensors");
    assert!(stylediff::invert::artifact::load(&artifact, &candle_core::Device::Cpu).is_ok());
}

#[test]
fn jobs_wait_their_turn_cancel_leaves_nothing_and_a_full_queue_says_503() {
    let data = tempfile::tempdir().unwrap();
    let s = serve(data.path(), &["--queue", "1"]);
    let png = scene(&s);
    let long = [("prompt", PROMPT), ("steps", "50"), ("inner_steps", "50")];
    let (status, a) = start_inversion(&s, &png, &long);
    assert_eq!(status, 202);
    let a = a["job"].as_str().unwrap().to_string();
    // Wait until the first job runs, so the queue's one place is free for the second.
    let start = Instant::now();
    while job_status(&s, &a)["next"].as_u64().unwrap() == 0 {
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
    let quick = [
        ("prompt", "a red circle on a green background"),
        ("steps", "3"),
        ("inner_steps", "1"),
    ];
    let (status, b) = start_inversion(&s, &png, &quick);
    assert_eq!(status, 202, "{b}");
    let b = b["job"].as_str().unwrap().to_string();
    let waiting = job_status(&s, &b);
    assert_eq!(
        (waiting["status"].as_str(), waiting["position"].as_u64()),
        (Some("queued"), Some(1))
    );
    let (status, full) = start_inversion(&s, &png, &quick);
    assert_eq!(status, 503, "{full}");
    assert!(full["error"].as_str().unwrap().contains("queue is full"));

    let (status, _) = call(ureq::post(&format!("{}api/jobs/{a}/cancel", s.url)), None);
    assert_eq!(status, 200);
    assert_eq!(finish(&s, &a).0["status"], "cancelled");
    assert_eq!(finish(&s, &b).0["status"], "done");
    // Only the finished inversion is on disk; the cancelled one left nothing.
    let kept: Vec<_> = std::fs::read_dir(data.path()).unwrap().collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        json_of(&get(&s, "api/inversions").1)
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn bad_requests_get_4xx_with_a_clear_message() {
    let data = tempfile::tempdir().unwrap();
    let s = serve(data.path(), &[]);
    let png = scene(&s);
    let expect = |(status, body): (u16, Value), want: u16, words: &[&str]| {
        assert_eq!(status, want, "{body}");
        let message = body["error"].as_str().unwrap_or_default().to_string();
        for w in words {
            assert!(message.contains(w), "{message:?} lacks {w:?}");
        }
    };
    expect(
        start_inversion(&s, b"not an image at all", &[("prompt", PROMPT)]),
        400,
        &["cannot"],
    );
    let long_prompt = vec!["red"; 78].join(" ");
    expect(
        start_inversion(&s, &png, &[("prompt", &long_prompt)]),
        400,
        &["77"],
    );
    expect(
        start_inversion(&s, &png, &[("prompt", PROMPT), ("guidance", "NaN")]),
        400,
        &["guidance"],
    );
    expect(
        start_inversion(&s, &png, &[("prompt", PROMPT), ("method", "magic")]),
        400,
        &["magic"],
    );
    let huge = vec![0u8; 21 << 20];
    let (ct, body) = form(&[("prompt", PROMPT)], &huge);
    let status = post_reading_early_reply(&s, "api/inversions", &ct, &body);
    assert_eq!(status, 413, "an upload over the limit");
    let unknown = "0123456789abcdef0123456789abcdef";
    expect(
        post_json(
            &s,
            "api/edits",
            json!({ "inversion": unknown, "target": PROMPT }),
        ),
        404,
        &["not known"],
    );
    expect(
        post_json(
            &s,
            "api/edits",
            json!({ "inversion": "../../etc", "target": PROMPT }),
        ),
        400,
        &["not an id"],
    );
    expect(
        post_json(
            &s,
            "api/edits",
            json!({ "inversion": unknown, "target": PROMPT, "colour": 1 }),
        ),
        400,
        &["colour"],
    );
    let (status, _) = get(&s, &format!("api/jobs/{unknown}"));
    assert_eq!(status, 404);
    let (status, body) = call(
        ureq::get(&format!("{}api/info", s.url)).set("Origin", "http://elsewhere.example"),
        None,
    );
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));

    // Words are checked against the prompt before the job is queued.
    let (_, r) = start_inversion(
        &s,
        &png,
        &[("prompt", PROMPT), ("steps", "2"), ("inner_steps", "1")],
    );
    let inversion = finish(&s, r["job"].as_str().unwrap()).0["result"]["inversion"]
        .as_str()
        .unwrap()
        .to_string();
    expect(
        post_json(
            &s,
            "api/edits",
            json!({ "inversion": inversion, "target": "a green circle on a blue background", "blend": [["square"], ["circle"]] }),
        ),
        400,
        &["\"square\""],
    );
    expect(
        post_json(
            &s,
            "api/edits",
            json!({ "inversion": inversion, "target": PROMPT, "tau_c": 1.5 }),
        ),
        400,
        &["tau_c"],
    );
    let nan = format!(r#"{{"inversion": "{inversion}", "target": "{PROMPT}", "tau_v": NaN}}"#);
    let (status, body) = call(
        ureq::post(&format!("{}api/edits", s.url)),
        Some(("application/json", nan.into_bytes())),
    );
    assert_eq!(status, 400, "NaN tau: {}", String::from_utf8_lossy(&body));

    // With a token, every request needs it.
    drop(s);
    let s = serve(data.path(), &["--token", "s3cret"]);
    let (status, _) = get(&s, "api/info");
    assert_eq!(status, 401);
    let (status, _) = call(
        ureq::get(&format!("{}api/info", s.url)).set("Authorization", "Bearer wrong"),
        None,
    );
    assert_eq!(status, 401);
    let (status, _) = call(
        ureq::get(&format!("{}api/info", s.url)).set("Authorization", "Bearer s3cret"),
        None,
    );
    assert_eq!(status, 200);
}

#[test]
fn binding_beyond_loopback_needs_a_token() {
    let data = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_stylediff"))
        .args(["serve", "--host", "0.0.0.0", "--port", "0", "--data-dir"])
        .arg(data.path())
        .env_remove("STYLEDIFF_TOKEN")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs a token"));
}

/// Resident memory of a process, in KiB (Linux).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|v| v.parse().unwrap()))
        })
        .unwrap_or(0)
}

/// 8 clients send 100 edits at once: every job ends done, each ran exactly once (its progress holds each step
/// once), within a time cap, and the server's memory stays bounded.
#[test]
fn eight_clients_a_hundred_jobs_none_lost_none_twice() {
    let data = tempfile::tempdir().unwrap();
    let s = serve(data.path(), &["--queue", "128"]);
    let png = scene(&s);
    let (_, r) = start_inversion(
        &s,
        &png,
        &[("prompt", PROMPT), ("steps", "3"), ("inner_steps", "1")],
    );
    let inversion = finish(&s, r["job"].as_str().unwrap()).0["result"]["inversion"]
        .as_str()
        .unwrap()
        .to_string();
    let pid = s.child.id();
    let start = Instant::now();
    let jobs: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|client| {
                let (s, inversion) = (&s, &inversion);
                scope.spawn(move || {
                    (0..100)
                        .filter(|k| k % 8 == client)
                        .map(|k| {
                            let tau = format!("{:.2}", (k % 20) as f64 * 0.05);
                            let (status, r) = post_json(
                                s,
                                "api/edits",
                                json!({ "inversion": inversion, "target": "a green circle on a blue background",
                                        "tau_s": tau.parse::<f64>().unwrap() }),
                            );
                            assert_eq!(status, 202, "{r}");
                            r["job"].as_str().unwrap().to_string()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(jobs.len(), 100);
    let distinct: std::collections::HashSet<_> = jobs.iter().collect();
    assert_eq!(distinct.len(), 100, "every request got its own job");
    let mut rss_after_20 = 0;
    for (k, job) in jobs.iter().enumerate() {
        let (v, events) = finish(&s, job);
        assert_eq!(v["status"], "done", "{v}");
        let steps: Vec<u64> = events.iter().map(|e| e["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, vec![1, 2, 3], "job {job} ran once, each step once");
        if k == 20 {
            rss_after_20 = rss_kib(pid);
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(240),
        "took {:?}",
        start.elapsed()
    );
    let rss_end = rss_kib(pid);
    eprintln!("server resident memory: {rss_after_20} KiB after 20 jobs, {rss_end} KiB after 100");
    assert!(
        rss_end < rss_after_20 + 100 * 1024,
        "memory grew from {rss_after_20} to {rss_end} KiB"
    );
}
