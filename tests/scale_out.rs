//! `batch` across machines: shards from --shard, Kubernetes' JOB_COMPLETION_INDEX, per-case locks, merge, plan,
//! the deploy/k8s manifest, and `bench` shards. (A real Slurm cluster is in tests/slurm.rs.) Toy model, tiny runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_stylediff");

use common::{all_jobs, done_counts, same_results, toy_batch};
const FAST: [&str; 4] = ["--steps", "4", "--inner-steps", "2"];

fn batch(csv: &Path, out: &Path) -> Command {
    batch_with(csv, out, &FAST)
}

fn batch_with(csv: &Path, out: &Path, settings: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("batch")
        .arg("--csv")
        .arg(csv)
        .arg("--out-dir")
        .arg(out)
        .args(settings)
        // A test runner may itself run under a scheduler: only the variables a test sets count.
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("STYLEDIFF_SHARDS");
    c
}

fn merge(csv: &Path, out: &Path) -> Output {
    Command::new(BIN)
        .args(["batch", "merge", "--csv"])
        .arg(csv)
        .arg("--out-dir")
        .arg(out)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn indexed_job_shards_merge_into_the_single_machine_result() {
    let dir = tempfile::tempdir().unwrap();
    let csv = toy_batch(dir.path(), 7);
    let single = dir.path().join("single");
    let o = batch(&csv, &single).output().unwrap();
    assert!(o.status.success(), "{}", common::text(&o));

    // Shards 0 and 1 of 3 at once, as pods of an Indexed Job; shard 2 not yet.
    let shared = dir.path().join("shared");
    let pods: Vec<_> = (0..2)
        .map(|i| {
            batch(&csv, &shared)
                .env("JOB_COMPLETION_INDEX", i.to_string())
                .env("STYLEDIFF_SHARDS", "3")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut logs: Vec<String> = Vec::new();
    for (i, pod) in pods.into_iter().enumerate() {
        let o = pod.wait_with_output().unwrap();
        let log = stderr(&o);
        assert!(o.status.success(), "{log}");
        assert!(
            log.contains(&format!("shard {i}/3 (Kubernetes Indexed Job")),
            "{log}"
        );
        logs.push(log);
    }
    assert!(shared.join("results-shard-0-of-3.csv").is_file());

    // The merge finds shard 2's cases missing, fails, and prints the command that finishes them.
    let o = merge(&csv, &shared);
    let out = common::text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("missing"), "{out}");
    let finish: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("stylediff batch"))
        .collect();
    assert_eq!(finish.len(), 1, "{out}");
    assert!(finish[0].contains("--shard 2/3"), "{out}");
    let words: Vec<&str> = finish[0].split_whitespace().collect();
    let o = Command::new(BIN).args(&words[1..]).output().unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    logs.push(stderr(&o));

    let o = merge(&csv, &shared);
    let out = common::text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("7 cases: 7 done, 0 failed, 0 missing"),
        "{out}"
    );

    // Every job done exactly once across the shards; the files equal the single machine's.
    let counts = done_counts(&logs);
    let jobs = all_jobs(&csv);
    assert_eq!(counts.len(), jobs.len(), "{counts:?}");
    for job in &jobs {
        assert_eq!(counts.get(job), Some(&1), "{job:?}: {counts:?}");
    }
    let inversions = 7;
    assert_eq!(
        same_results(&single, &shared),
        inversions + 2 * (jobs.len() - inversions),
        "every inversion, edit and grid compared"
    );
    let table = std::fs::read_to_string(shared.join("results.csv")).unwrap();
    assert_eq!(table.lines().count(), 1 + jobs.len(), "{table}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shared.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["done"], 7);
    assert_eq!(summary["per_shard"].as_array().unwrap().len(), 3);

    // `batch plan` prints the partition the shards ran.
    let o = Command::new(BIN)
        .args(["batch", "plan", "--shards", "3", "--csv"])
        .arg(&csv)
        .args(FAST)
        .output()
        .unwrap();
    let plan = common::text(&o);
    assert!(o.status.success(), "{plan}");
    for case in stylediff::batch::read_csv(&csv).unwrap() {
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(shared.join(format!("case_{}/case.json", case.case))).unwrap(),
        )
        .unwrap();
        let shard = record["shard"]["index"].as_u64().unwrap();
        let line = plan
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{shard}/3 ")))
            .unwrap_or_else(|| panic!("{plan}"));
        assert!(
            line.split_whitespace().any(|w| w == case.case),
            "case {} ran on shard {shard}: {plan}",
            case.case
        );
    }
}

#[test]
fn the_same_shard_started_twice_runs_each_case_once() {
    let dir = tempfile::tempdir().unwrap();
    let csv = toy_batch(dir.path(), 6);
    let shared = dir.path().join("shared");
    let runs: Vec<_> = ["0/2", "0/2", "1/2"]
        .iter()
        .map(|s| {
            batch(&csv, &shared)
                .args(["--shard", s])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let logs: Vec<String> = runs
        .into_iter()
        .map(|r| {
            let o = r.wait_with_output().unwrap();
            assert!(o.status.success(), "{}", common::text(&o));
            stderr(&o)
        })
        .collect();
    let counts = done_counts(&logs);
    for job in all_jobs(&csv) {
        assert_eq!(counts.get(&job), Some(&1), "{job:?} in {logs:#?}");
    }
    let o = merge(&csv, &shared);
    assert!(o.status.success(), "{}", common::text(&o));
    let leftovers: Vec<_> = std::fs::read_dir(&shared)
        .unwrap()
        .flat_map(|c| std::fs::read_dir(c.unwrap().path()).into_iter().flatten())
        .map(|f| f.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "locks or temporaries left: {leftovers:?}"
    );
}

/// Waits until some case of `out` holds a lock (a case is running), or panics after a minute.
fn wait_for_a_running_case(out: &Path, child: &mut std::process::Child) -> PathBuf {
    let start = Instant::now();
    loop {
        if let Ok(dir) = std::fs::read_dir(out) {
            for case in dir.flatten() {
                let lock = case.path().join(".lock");
                if lock.is_file() {
                    return lock;
                }
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the batch ended before a case was seen running"
        );
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_shard_leaves_a_stale_lock_that_its_rerun_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let csv = toy_batch(dir.path(), 5);
    let out = dir.path().join("out");
    // A long stale limit: the rerun must see that the holder's process is gone, not wait for the limit.
    let args = ["--shard", "0/1", "--lock-stale-after", "3600"];
    let mut child = batch(&csv, &out)
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lock = wait_for_a_running_case(&out, &mut child);
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    assert!(lock.is_file(), "a killed holder leaves its lock");
    let started = Instant::now();
    let o = batch(&csv, &out).args(args).output().unwrap();
    let log = stderr(&o);
    assert!(o.status.success(), "{log}");
    assert!(!log.contains("being run by"), "{log}");
    assert!(started.elapsed() < Duration::from_secs(600));
    let o = merge(&csv, &out);
    assert!(o.status.success(), "{}", common::text(&o));
    // A CSV kept as the batch folder's results.csv is not overwritten by the merge.
    let inside = out.join("results.csv");
    std::fs::copy(&csv, &inside).unwrap();
    let before = std::fs::read(&inside).unwrap();
    let o = merge(&inside, &out);
    assert!(!o.status.success());
    assert!(
        common::text(&o).contains("would overwrite the CSV"),
        "{}",
        common::text(&o)
    );
    assert_eq!(std::fs::read(&inside).unwrap(), before);
}

#[test]
fn sigterm_stops_at_the_next_step_and_releases_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let csv = toy_batch(dir.path(), 2);
    let out = dir.path().join("out");
    // Slow enough that the signal lands within a case.
    let slow = ["--steps", "30", "--inner-steps", "20"];
    let mut child = batch_with(&csv, &out, &slow)
        .arg("--shard=0/1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_a_running_case(&out, &mut child);
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let o = child.wait_with_output().unwrap();
    let log = stderr(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("stopped by a signal"), "{log}");
    let locks: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|c| c.path().join(".lock").exists())
        .collect();
    assert!(locks.is_empty(), "the lock is released: {log}");
    // The merge sees the batch unfinished; the same command finishes it.
    assert!(!merge(&csv, &out).status.success());
    let o = batch_with(&csv, &out, &slow)
        .arg("--shard=0/1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(merge(&csv, &out).status.success());
}

#[test]
fn shards_refuse_a_folder_of_other_settings_and_bad_shards() {
    let dir = tempfile::tempdir().unwrap();
    let csv = toy_batch(dir.path(), 2);
    let out = dir.path().join("out");
    let o = batch(&csv, &out).args(["--shard", "0/2"]).output().unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    let o = batch(&csv, &out)
        .args(["--shard", "1/2", "--guidance", "5"])
        .output()
        .unwrap();
    let log = stderr(&o);
    assert!(!o.status.success());
    assert!(
        log.contains("batch.json") && log.contains("another --out-dir"),
        "{log}"
    );
    for (args, env, says) in [
        (vec!["--shard", "2/2"], None, "shards are numbered 0 to 1"),
        (vec!["--shard", "1"], None, "expected I/N"),
        (vec![], Some(("JOB_COMPLETION_INDEX", "1")), "--shards"),
        (vec!["--shards", "3"], None, "which shard is this"),
    ] {
        let mut c = batch(&csv, &out);
        c.args(&args);
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert!(!o.status.success(), "{args:?}");
        assert!(
            common::text(&o).contains(says),
            "{args:?}: {}",
            common::text(&o)
        );
    }
}

/// The value after `flag` in `args`, replaced (or the pair removed when `value` is None).
fn set_flag(args: &mut Vec<String>, flag: &str, value: Option<&str>) {
    if let Some(k) = args.iter().position(|a| a == flag) {
        match value {
            Some(v) => args[k + 1] = v.to_string(),
            None => {
                args.drain(k..k + 2);
            }
        }
    } else if let Some(v) = value {
        args.extend([flag.to_string(), v.to_string()]);
    }
}

#[test]
fn the_kubernetes_manifest_runs_as_written() {
    use yaml_rust2::YamlLoader;
    let text =
        std::fs::read_to_string(common::repo_path("deploy/k8s/stylediff-batch.yaml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).unwrap();
    let job = |stage: &str| {
        docs.iter()
            .find(|d| d["metadata"]["labels"]["stage"].as_str() == Some(stage))
            .unwrap_or_else(|| panic!("no Job with stage {stage}"))
    };
    let (shards, merge_job) = (job("shards"), job("merge"));
    assert_eq!(shards["kind"].as_str(), Some("Job"));
    assert_eq!(shards["spec"]["completionMode"].as_str(), Some("Indexed"));
    let completions = shards["spec"]["completions"].as_i64().unwrap();
    let container = |j: &yaml_rust2::Yaml| {
        let c = &j["spec"]["template"]["spec"]["containers"][0];
        let words = |v: &yaml_rust2::Yaml| -> Vec<String> {
            v.as_vec()
                .unwrap()
                .iter()
                .map(|w| w.as_str().unwrap().to_string())
                .collect()
        };
        let env: Vec<(String, String)> = c["env"]
            .as_vec()
            .map(|v| {
                v.iter()
                    .map(|e| {
                        (
                            e["name"].as_str().unwrap().to_string(),
                            e["value"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        (words(&c["command"]), words(&c["args"]), env)
    };
    let (command, mut args, env) = container(shards);
    assert_eq!(command, ["stylediff"]);
    assert_eq!(args[0], "batch");
    let count = env
        .iter()
        .find(|(k, _)| k == "STYLEDIFF_SHARDS")
        .map(|(_, v)| v.clone())
        .expect("STYLEDIFF_SHARDS");
    assert_eq!(
        count,
        completions.to_string(),
        "STYLEDIFF_SHARDS equals completions"
    );
    let (merge_command, mut merge_args, _) = container(merge_job);
    assert_eq!(merge_command, ["stylediff"]);
    assert_eq!(&merge_args[..2], ["batch", "merge"]);
    let value = |a: &[String], f: &str| a.iter().position(|x| x == f).map(|k| a[k + 1].clone());
    for flag in ["--csv", "--out-dir"] {
        assert_eq!(value(&args, flag), value(&merge_args, flag), "{flag}");
    }

    // The same commands, on this machine's paths and the toy model, one process per index.
    let dir = tempfile::tempdir().unwrap();
    let csv = toy_batch(dir.path(), 5);
    let out = dir.path().join("out");
    for a in [&mut args, &mut merge_args] {
        set_flag(a, "--csv", Some(csv.to_str().unwrap()));
        set_flag(a, "--out-dir", Some(out.to_str().unwrap()));
    }
    set_flag(&mut args, "--model", None);
    set_flag(&mut args, "--device", Some("cpu"));
    for (flag, v) in FAST.chunks(2).map(|p| (p[0], p[1])) {
        set_flag(&mut args, flag, Some(v));
    }
    for index in 0..completions {
        let mut c = Command::new(BIN);
        c.args(&args)
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env("JOB_COMPLETION_INDEX", index.to_string());
        for (k, v) in &env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "index {index}: {}", common::text(&o));
        assert!(
            stderr(&o).contains(&format!("shard {index}/{completions}")),
            "{}",
            stderr(&o)
        );
    }
    let o = Command::new(BIN).args(&merge_args).output().unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
}

#[test]
fn bench_shards_merge_into_the_whole_bench() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "bench",
        "--cases",
        "3",
        "--steps",
        "3",
        "--inner-steps",
        "2",
        "--methods",
        "ddim,stylediffusion-p2plus",
    ];
    let run = |out: &Path, extra: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg("--out-dir")
            .arg(out)
            .args(extra)
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("JOB_COMPLETION_INDEX")
            .env_remove("STYLEDIFF_SHARDS")
            .output()
            .unwrap()
    };
    let whole = dir.path().join("whole");
    let o = run(&whole, &[]);
    assert!(o.status.success(), "{}", common::text(&o));
    let shared = dir.path().join("shared");
    let o = run(&shared, &["--shard", "0/2"]);
    assert!(o.status.success(), "{}", common::text(&o));
    assert!(
        !shared.join("results.csv").exists(),
        "a shard writes only its own table"
    );
    let o = run(&shared, &["--merge", "--shards", "2"]);
    let log = common::text(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("--shard 1/2"), "{log}");
    let o = run(&shared, &["--shard", "1/2"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let o = run(&shared, &["--merge"]);
    assert!(o.status.success(), "{}", common::text(&o));
    // The same rows but for the timings.
    let rows = |p: &Path| -> Vec<String> {
        let mut r = csv::Reader::from_path(p.join("results.csv")).unwrap();
        let headers = r.headers().unwrap().clone();
        r.records()
            .map(|rec| {
                let rec = rec.unwrap();
                headers
                    .iter()
                    .zip(rec.iter())
                    .filter(|(h, _)| !matches!(*h, "seconds" | "peak_mb"))
                    .map(|(_, v)| v.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect()
    };
    assert_eq!(rows(&whole), rows(&shared));
    assert_eq!(rows(&whole).len(), 3 * 2);
    assert!(shared.join("summary.md").is_file() && shared.join("gallery.png").is_file());
}
