//! Splitting a batch across machines: which shard runs which case.
//!
//! Every shard computes the same partition from the same inputs (the cases' identities and costs and the number
//! of shards), so shards need no coordinator: a Slurm array task or a Kubernetes Indexed Job pod knows its own
//! cases from its index alone.

use std::fmt;

use sha2::Digest;

use crate::{Error, Result};

/// Shard `index` (0-based) of `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// At most this many shards (a job array wider than a batch's cases leaves most shards idle).
pub const MAX_SHARDS: usize = 100_000;

impl Shard {
    /// The whole batch in one shard.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 || count > MAX_SHARDS {
            return Err(Error::invalid(
                "shard count",
                format!("{count}: must be between 1 and {MAX_SHARDS}"),
            ));
        }
        if index >= count {
            return Err(Error::invalid(
                "shard",
                format!("{index}/{count}: shards are numbered 0 to {}", count - 1),
            ));
        }
        Ok(Self { index, count })
    }

    /// `I/N`, shard I (counted from 0) of N.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "shard",
                format!("{text:?}: expected I/N, shard I (counted from 0) of N, e.g. 0/4"),
            )
        };
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let i = i.trim().parse::<usize>().map_err(|_| bad())?;
        let n = n.trim().parse::<usize>().map_err(|_| bad())?;
        Self::new(i, n)
    }

    pub fn is_all(&self) -> bool {
        self.count == 1
    }

    /// A short name for file names: `shard-2-of-8`.
    pub fn file_stem(&self) -> String {
        format!("shard-{}-of-{}", self.index, self.count)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Where a shard number came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardSource {
    /// `--shard I/N` on the command line.
    Given,
    /// A Slurm job array task (`SLURM_ARRAY_TASK_ID`).
    SlurmArray { job: Option<String>, task: i64 },
    /// A Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`).
    KubernetesIndexedJob,
    /// No shard given and no scheduler's variables: the whole batch.
    Whole,
}

impl fmt::Display for ShardSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardSource::Given => write!(f, "--shard"),
            ShardSource::SlurmArray { job, task } => match job {
                Some(j) => write!(f, "Slurm array job {j}, task {task}"),
                None => write!(f, "Slurm array task {task}"),
            },
            ShardSource::KubernetesIndexedJob => {
                write!(f, "Kubernetes Indexed Job (JOB_COMPLETION_INDEX)")
            }
            ShardSource::Whole => write!(f, "no shard given"),
        }
    }
}

/// The variable that gives the shard count to a Kubernetes Indexed Job when `--shards` is not given.
pub const SHARDS_ENV: &str = "STYLEDIFF_SHARDS";

/// The shard this process runs: `given` (`--shard`) when present, else the scheduler's variables read through
/// `env` (Slurm: `SLURM_ARRAY_TASK_ID`, the shard itself when `shards` is given, else its place in the array from
/// `SLURM_ARRAY_TASK_COUNT` or `_MIN`/`_MAX`/`_STEP`; Kubernetes:
/// `JOB_COMPLETION_INDEX` with `shards` or [`SHARDS_ENV`]), else the whole batch.
pub fn resolve(
    given: Option<Shard>,
    shards: Option<usize>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Shard, ShardSource)> {
    if let Some(s) = given {
        if let Some(n) = shards.filter(|&n| n != s.count) {
            return Err(Error::invalid(
                "shards",
                format!("--shard {s} says {} shards but --shards says {n}", s.count),
            ));
        }
        return Ok((s, ShardSource::Given));
    }
    let int = |name: &'static str| -> Result<Option<i64>> {
        match env(name) {
            None => Ok(None),
            Some(v) if v.trim().is_empty() => Ok(None),
            Some(v) => v
                .trim()
                .parse::<i64>()
                .map(Some)
                .map_err(|_| Error::invalid(name, format!("{v:?} is not a whole number"))),
        }
    };
    if let Some(task) = int("SLURM_ARRAY_TASK_ID")? {
        let job = env("SLURM_ARRAY_JOB_ID").filter(|j| !j.is_empty());
        // With the count given, the task id is the shard: `--array=1,4` reruns shards 1 and 4 of N.
        if let Some(n) = shards {
            if task < 0 || task as usize >= n {
                return Err(Error::invalid(
                    "Slurm array",
                    format!(
                        "task {task} is not a shard of --shards {n} (shards are 0 to {})",
                        n.max(1) - 1
                    ),
                ));
            }
            return Ok((
                Shard::new(task as usize, n)?,
                ShardSource::SlurmArray { job, task },
            ));
        }
        let min = int("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let step = int("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
        let span = int("SLURM_ARRAY_TASK_MAX")?.map(|max| (max - min) / step + 1);
        let count = match (int("SLURM_ARRAY_TASK_COUNT")?, span) {
            (Some(c), Some(s)) if c != s => {
                return Err(Error::invalid(
                    "Slurm array",
                    format!(
                        "{c} tasks that are not one range (min {min}, step {step}, {s} in the range); \
                         submit the array as --array=0-{} so task ids map to shards",
                        c - 1
                    ),
                ));
            }
            (Some(c), _) | (None, Some(c)) => c,
            (None, None) => {
                return Err(Error::invalid(
                    "Slurm array",
                    "SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_COUNT or SLURM_ARRAY_TASK_MAX",
                ));
            }
        };
        if (task - min) % step != 0 || task < min {
            return Err(Error::invalid(
                "Slurm array",
                format!("task {task} is not in the range from {min} by {step}"),
            ));
        }
        let shard = Shard::new(((task - min) / step) as usize, count.max(0) as usize)?;
        return Ok((shard, ShardSource::SlurmArray { job, task }));
    }
    if let Some(index) = int("JOB_COMPLETION_INDEX")? {
        let count = match shards {
            Some(n) => n,
            None => match int(SHARDS_ENV)? {
                Some(n) if n > 0 => n as usize,
                _ => {
                    return Err(Error::invalid(
                        "shards",
                        format!(
                            "JOB_COMPLETION_INDEX is {index} (a Kubernetes Indexed Job) but the number of shards \
                             is not given: pass --shards N (the Job's completions) or set {SHARDS_ENV}"
                        ),
                    ));
                }
            },
        };
        if index < 0 {
            return Err(Error::invalid(
                "JOB_COMPLETION_INDEX",
                format!("{index} is negative"),
            ));
        }
        return Ok((
            Shard::new(index as usize, count)?,
            ShardSource::KubernetesIndexedJob,
        ));
    }
    match shards {
        Some(n) if n != 1 => Err(Error::invalid(
            "shards",
            format!(
                "--shards {n} without --shard I/{n}, SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX: which shard is this?"
            ),
        )),
        _ => Ok((Shard::ALL, ShardSource::Whole)),
    }
}

/// One unit of work to place: its identity (stable across edits of the list around it) and its expected cost.
#[derive(Clone, Debug)]
pub struct Item {
    pub id: String,
    pub cost: f64,
}

/// How far above the mean a shard's cost may grow before a case goes to its next preferred shard.
const SLACK: f64 = 0.05;

/// A stable 64-bit hash (the first bytes of SHA-256: the same on every machine, compiler and release).
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The shard of each item, deterministic and balanced by cost.
///
/// Each item ranks the shards by a stable hash of (its id, shard) (rendezvous hashing: an item's preference
/// does not depend on the other items, so adding or removing items moves few others). Items are placed from the
/// most expensive down (ties by hash of the id, never by position) on their most preferred shard whose load stays
/// within the mean plus 5% (consistent hashing with bounded loads); an item too large for any falls to the least
/// loaded shard.
pub fn partition(items: &[Item], count: usize) -> Vec<usize> {
    let count = count.max(1);
    let total: f64 = items.iter().map(|i| i.cost.max(0.0)).sum();
    let capacity = total / count as f64 * (1.0 + SLACK);
    let mut order: Vec<(usize, u64)> = items
        .iter()
        .enumerate()
        .map(|(k, i)| (k, stable_hash(&[i.id.as_bytes()])))
        .collect();
    order.sort_by(|a, b| {
        items[b.0]
            .cost
            .total_cmp(&items[a.0].cost)
            .then(a.1.cmp(&b.1))
            .then(items[a.0].id.cmp(&items[b.0].id))
    });
    let mut load = vec![0.0f64; count];
    let mut shard_of = vec![0usize; items.len()];
    for (k, _) in order {
        let item = &items[k];
        let cost = item.cost.max(0.0);
        let mut prefs: Vec<(u64, usize)> = (0..count)
            .map(|s| {
                (
                    stable_hash(&[item.id.as_bytes(), &(s as u64).to_le_bytes()]),
                    s,
                )
            })
            .collect();
        prefs.sort_by(|a, b| b.cmp(a));
        let chosen = prefs
            .iter()
            .map(|&(_, s)| s)
            .find(|&s| load[s] + cost <= capacity + 1e-9)
            .unwrap_or_else(|| {
                prefs
                    .iter()
                    .map(|&(_, s)| s)
                    .min_by(|&a, &b| load[a].total_cmp(&load[b]))
                    .expect("at least one shard")
            });
        load[chosen] += cost;
        shard_of[k] = chosen;
    }
    shard_of
}

/// The size and cost of each shard under a partition.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ShardLoad {
    pub shard: usize,
    pub items: usize,
    pub cost: f64,
}

pub fn loads(items: &[Item], shard_of: &[usize], count: usize) -> Vec<ShardLoad> {
    let mut out: Vec<ShardLoad> = (0..count)
        .map(|shard| ShardLoad {
            shard,
            items: 0,
            cost: 0.0,
        })
        .collect();
    for (item, &s) in items.iter().zip(shard_of) {
        out[s].items += 1;
        out[s].cost += item.cost;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: usize, salt: &str) -> Vec<Item> {
        (0..n)
            .map(|k| Item {
                id: format!("{salt}{k}"),
                // An inversion plus 0..8 edits, as a tau sweep makes them.
                cost: 10.0 + 2.0 * (stable_hash(&[format!("{salt}{k}").as_bytes()]) % 9) as f64,
            })
            .collect()
    }

    #[test]
    fn parse_and_errors() {
        assert_eq!(Shard::parse("2/5").unwrap(), Shard { index: 2, count: 5 });
        for bad in ["5/5", "1/0", "a/3", "3", "-1/3", "1/3/4"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn balanced_by_cost() {
        for (n, shards) in [(300, 8), (37, 3), (1000, 16)] {
            let it = items(n, "case_");
            let part = partition(&it, shards);
            let l = loads(&it, &part, shards);
            let mean = it.iter().map(|i| i.cost).sum::<f64>() / shards as f64;
            let biggest = it.iter().map(|i| i.cost).fold(0.0, f64::max);
            for s in &l {
                assert!(
                    s.cost <= mean * (1.0 + SLACK) + biggest,
                    "{n} items in {shards}: {l:?}"
                );
            }
            // Every shard has work when there are many more items than shards.
            assert!(l.iter().all(|s| s.items > 0), "{l:?}");
        }
    }

    #[test]
    fn independent_of_order_and_stable_when_rows_are_added() {
        let it = items(400, "c");
        let part = partition(&it, 8);
        let mut rev = it.clone();
        rev.reverse();
        let part_rev = partition(&rev, 8);
        for (k, i) in it.iter().enumerate() {
            let r = rev.iter().position(|r| r.id == i.id).unwrap();
            assert_eq!(part[k], part_rev[r], "{}", i.id);
        }
        // 5% more rows: few existing cases change shard (a row-number split would move most).
        let mut more = it.clone();
        more.extend(items(20, "new"));
        let part_more = partition(&more, 8);
        let moved = (0..it.len()).filter(|&k| part[k] != part_more[k]).count();
        assert!(moved * 10 < it.len(), "{moved} of {} moved", it.len());
    }

    #[test]
    fn slurm_and_kubernetes_variables() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let slurm = env(&[
            ("SLURM_ARRAY_JOB_ID", "77"),
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "9"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "5"),
        ]);
        let (s, src) = resolve(None, None, &slurm).unwrap();
        assert_eq!((s.index, s.count), (2, 5));
        assert!(src.to_string().contains("77"));
        let list = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "9"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        assert!(resolve(None, None, &list).is_err());
        // A resubmitted subset (--array=1,4 of 8 shards): the task id is the shard.
        assert_eq!(
            resolve(None, Some(8), &list).unwrap().0,
            Shard { index: 5, count: 8 }
        );
        assert!(resolve(None, Some(5), &list).is_err());
        let k8s = env(&[("JOB_COMPLETION_INDEX", "3")]);
        assert!(
            resolve(None, None, &k8s)
                .unwrap_err()
                .to_string()
                .contains("--shards")
        );
        assert_eq!(
            resolve(None, Some(4), &k8s).unwrap().0,
            Shard { index: 3, count: 4 }
        );
        let k8s_env = env(&[("JOB_COMPLETION_INDEX", "1"), (SHARDS_ENV, "2")]);
        assert_eq!(
            resolve(None, None, &k8s_env).unwrap().0,
            Shard { index: 1, count: 2 }
        );
        assert!(resolve(None, Some(2), &env(&[("JOB_COMPLETION_INDEX", "2")])).is_err());
        // --shard wins over the environment.
        let given = Shard::new(0, 5).unwrap();
        assert_eq!(
            resolve(Some(given), None, &slurm).unwrap(),
            (given, ShardSource::Given)
        );
        assert_eq!(resolve(None, None, &env(&[])).unwrap().0, Shard::ALL);
        assert!(resolve(None, Some(3), &env(&[])).is_err());
    }
}
