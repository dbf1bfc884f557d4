//! deploy/slurm on a real one-node Slurm cluster (tests/slurm/one-node-cluster.sh: munged, slurmctld and slurmd
//! as root, configured under a temporary folder): a 3-task array of toy cases through submit.sh, one task requeued
//! mid-case, the dependent merge job; every job done exactly once and the files equal a single-machine run.
//! Runs where STYLEDIFF_SLURM_TEST=1 (set by .ci/run, which installs Slurm); skips with a reason elsewhere.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{all_jobs, done_counts, same_results, toy_batch};

const BIN: &str = env!("CARGO_BIN_EXE_stylediff");

/// Stops the cluster whatever happens to the test.
struct Cluster {
    dir: PathBuf,
    script: PathBuf,
}

impl Cluster {
    fn start(dir: &Path) -> Self {
        let script = common::repo_path("tests/slurm/one-node-cluster.sh");
        std::fs::create_dir_all(dir).unwrap();
        let cluster = Cluster {
            dir: dir.to_path_buf(),
            script,
        };
        let o = Command::new("bash")
            .arg(&cluster.script)
            .arg("start")
            .arg(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "cluster start: {}", common::text(&o));
        cluster
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("slurm.conf")
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let o = Command::new(program)
            .args(args)
            .env("SLURM_CONF", self.conf())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{program} {args:?}: {}",
            common::text(&o)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    /// `scontrol show job` fields of a job (for an array, of its first listed task).
    fn job_field(&self, job: &str, field: &str) -> Option<String> {
        let o = Command::new("scontrol")
            .args(["show", "job", job])
            .env("SLURM_CONF", self.conf())
            .output()
            .ok()?;
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{field}=")).map(str::to_string))
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["slurmctld.log", "slurmd.log"] {
            let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {name}\n"));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

fn slurm_available() -> Result<(), String> {
    for tool in ["munged", "slurmctld", "slurmd", "sbatch", "scontrol"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err(format!("{tool} is not installed"));
        }
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Err("the test cluster's daemons need root".into());
    }
    Ok(())
}

#[test]
fn a_slurm_array_with_a_requeued_task_merges_into_the_single_machine_result() {
    let required = std::env::var("STYLEDIFF_SLURM_TEST").is_ok_and(|v| v == "1");
    if let Err(why) = slurm_available() {
        assert!(!required, "STYLEDIFF_SLURM_TEST=1 but {why}");
        eprintln!(
            "SKIPPED: {why} (set STYLEDIFF_SLURM_TEST=1 where Slurm is installed; .ci/run does)"
        );
        return;
    }
    if !required {
        eprintln!(
            "SKIPPED: set STYLEDIFF_SLURM_TEST=1 to start a throwaway Slurm cluster (as .ci/run does)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let csv = toy_batch(work, 6);
    // Enough steps that a case takes a few seconds and the requeue lands inside one.
    let settings = "--steps 6 --inner-steps 4";
    let t0 = Instant::now();
    let single = work.join("single");
    let o = Command::new(BIN)
        .args(["batch", "--csv"])
        .arg(&csv)
        .arg("--out-dir")
        .arg(&single)
        .args(settings.split(' '))
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::text(&o));

    eprintln!(
        "[{:.1}s] single-machine run done",
        t0.elapsed().as_secs_f64()
    );
    let cluster = Cluster::start(&work.join("cluster"));
    eprintln!("[{:.1}s] cluster up", t0.elapsed().as_secs_f64());
    let shared = work.join("shared");
    let submit = common::repo_path("deploy/slurm/submit.sh");
    // The test node has no GPUs and 2 CPUs: the jobs' resource requests are narrowed for it.
    let o = Command::new("bash")
        .arg(&submit)
        .args([
            "--gres=none",
            "--cpus-per-task=1",
            "--mem=200M",
            "--time=15",
        ])
        .current_dir(work)
        .env("SLURM_CONF", cluster.conf())
        .env("CSV", &csv)
        .env("OUT_DIR", &shared)
        .env("SHARDS", "3")
        .env("STYLEDIFF", BIN)
        .env("DEVICE", "cpu")
        .env("STYLEDIFF_ARGS", settings)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "submit: {}", common::text(&o));
    let said = String::from_utf8_lossy(&o.stdout).to_string();
    let words: Vec<&str> = said.split_whitespace().collect();
    let array = words[words.iter().position(|w| *w == "array").unwrap() + 2].to_string();
    let merge = words.last().unwrap().to_string();

    // Requeue the task that holds a case lock, mid-case (as a preemption would).
    let start = Instant::now();
    let requeued = loop {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no case started: {}",
            cluster.logs()
        );
        let holder = std::fs::read_dir(&shared).ok().and_then(|d| {
            d.flatten().find_map(|c| {
                let lock: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(c.path().join(".lock")).ok()?).ok()?;
                let owner = lock["owner"].as_str()?.to_string();
                let task = owner
                    .split("task ")
                    .nth(1)?
                    .trim_end_matches(')')
                    .to_string();
                Some((c.file_name().to_string_lossy().to_string(), task))
            })
        });
        if let Some(found) = holder {
            break found;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (case_dir, task) = requeued;
    let requeued_job = format!("{array}_{task}");
    cluster.run("scontrol", &["requeue", &requeued_job]);
    // Slurm holds a requeued job back for a while (its begin time); let it start now.
    let start = Instant::now();
    while cluster.job_field(&requeued_job, "JobState").as_deref() != Some("PENDING") {
        assert!(start.elapsed() < Duration::from_secs(60), "not requeued");
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.run(
        "scontrol",
        &["update", &format!("JobId={requeued_job}"), "StartTime=now"],
    );
    eprintln!(
        "[{:.1}s] task {task} requeued while on {case_dir}",
        t0.elapsed().as_secs_f64()
    );

    // The merge job runs after every task has ended, the requeued one included.
    let start = Instant::now();
    loop {
        let state = cluster.job_field(&merge, "JobState").unwrap_or_default();
        if matches!(
            state.as_str(),
            "COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT"
        ) {
            assert_eq!(
                state,
                "COMPLETED",
                "merge job: {}",
                std::fs::read_to_string(work.join(format!("stylediff-merge-{merge}.log")))
                    .unwrap_or_default()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(400),
            "merge job still {state}: {}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("[{:.1}s] merge job completed", t0.elapsed().as_secs_f64());
    let merge_log =
        std::fs::read_to_string(work.join(format!("stylediff-merge-{merge}.log"))).unwrap();
    assert!(
        merge_log.contains("6 cases: 6 done, 0 failed, 0 missing"),
        "{merge_log}"
    );

    let logs: Vec<String> = (0..3)
        .map(|t| {
            std::fs::read_to_string(work.join(format!("stylediff-batch-{array}_{t}.log"))).unwrap()
        })
        .collect();
    let requeued_log = &logs[task.parse::<usize>().unwrap()];
    assert!(
        requeued_log.contains("stopped by a signal") && requeued_log.contains("restart 1"),
        "task {task} (running {case_dir} when requeued) was stopped and ran again: {requeued_log}"
    );
    if std::env::var_os("STYLEDIFF_SLURM_TEST_SHOW").is_some() {
        eprintln!("{logs:#?}\n{}", cluster.logs());
    }
    let counts = done_counts(&logs);
    let jobs = all_jobs(&csv);
    for job in &jobs {
        assert_eq!(counts.get(job), Some(&1), "{job:?} in {logs:#?}");
    }
    assert_eq!(counts.len(), jobs.len());
    assert_eq!(
        same_results(&single, &shared),
        6 + 2 * (jobs.len() - 6),
        "every inversion, edit and grid equals the single-machine run"
    );
}
