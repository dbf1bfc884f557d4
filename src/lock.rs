//! A lock per case in a folder that several machines share (NFS, Lustre, GPFS...), so that two processes given
//! the same work by mistake do not both run it.
//!
//! The lock is a file made by exclusive creation. Its holder rewrites it every `stale_after / 4` (a heartbeat
//! from a thread of its own, so a long UNet evaluation does not delay it). A lock is stale when its holder is
//! provably gone (same machine, same boot, and its process no longer exists) or its heartbeat is older than
//! `stale_after` (a holder on another machine that died); a stale lock is set aside by a rename and taken.
//!
//! Results never depend on the lock: every output is written atomically and proven current by its fingerprint,
//! so even two holders (a stale judgement on a machine with a wrong clock) would write the same files. The lock
//! saves the duplicated work.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use crate::denoise::CancelToken;
use crate::{Error, Result};

/// Who holds a lock, as its file records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Holder {
    /// Unique to one acquisition.
    pub token: String,
    pub host: String,
    pub pid: u32,
    /// The kernel's boot id, so a pid is only compared within one boot of one machine.
    pub boot: String,
    /// The process's start time (clock ticks since boot), so a reused pid is not taken for the holder.
    pub process_start: String,
    /// The holder's pid namespace: containers on one machine can share its host name but not their pids.
    #[serde(default)]
    pub pid_namespace: String,
    /// What the holder is (e.g. "shard 2/8, Slurm array job 77, task 2").
    pub owner: String,
    /// Seconds since the Unix epoch at acquisition.
    pub since: u64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {} on {})", self.owner, self.pid, self.host)
    }
}

/// The answer to [`acquire`].
pub enum Acquired {
    Held(CaseLock),
    /// Another live process holds it.
    Busy(Holder),
}

/// A held lock; released (its file removed) on drop.
pub struct CaseLock {
    path: PathBuf,
    token: String,
    lost: Arc<AtomicBool>,
    stop: Option<mpsc::Sender<()>>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
}

impl CaseLock {
    /// True when another process took the lock from this one (it judged it stale); the holder should stop.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for CaseLock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
        if read_holder(&self.path).is_some_and(|h| h.token == self.token) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot ("" where there is no /proc).
fn process_start(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields after its last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19).map(str::to_string)
}

fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn read_holder(path: &Path) -> Option<Holder> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Why a lock's holder is gone, or None while it may be alive.
pub fn stale_reason(
    holder: Option<&Holder>,
    age: Duration,
    stale_after: Duration,
) -> Option<String> {
    if age > stale_after {
        return Some(format!(
            "no heartbeat for {} s (limit {} s)",
            age.as_secs(),
            stale_after.as_secs()
        ));
    }
    let h = holder?;
    let boot = boot_id();
    let namespace = pid_namespace();
    if h.host != crate::util::host_name()
        || h.boot.is_empty()
        || boot.is_empty()
        || h.pid_namespace.is_empty()
        || h.pid_namespace != namespace
    {
        // Another machine, or pids this process cannot see: only the heartbeat's age tells.
        return None;
    }
    if h.boot != boot {
        return Some(format!("{} has rebooted since", h.host));
    }
    match process_start(h.pid) {
        None => Some(format!("process {} no longer exists", h.pid)),
        Some(start) if start != h.process_start => {
            Some(format!("process {} has ended (its pid is reused)", h.pid))
        }
        Some(_) => None,
    }
}

/// Takes the lock at `path` (its folder is created), or reports who holds it. A stale lock is broken and taken.
/// When `on_loss` is given, it is cancelled if another process takes the lock away.
pub fn acquire(
    path: &Path,
    owner: &str,
    stale_after: Duration,
    on_loss: Option<CancelToken>,
) -> Result<Acquired> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    }
    let pid = std::process::id();
    let me = Holder {
        token: format!(
            "{}-{pid}-{}",
            crate::util::host_name(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ),
        host: crate::util::host_name(),
        pid,
        boot: boot_id(),
        process_start: process_start(pid).unwrap_or_default(),
        pid_namespace: pid_namespace(),
        owner: owner.to_string(),
        since: now_unix(),
    };
    for _ in 0..3 {
        match create_exclusive(path, &me) {
            Ok(()) => {
                return Ok(Acquired::Held(start_heartbeat(
                    path,
                    me,
                    stale_after,
                    on_loss,
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(path, e)),
        }
        let age = match std::fs::metadata(path).and_then(|m| m.modified()) {
            Ok(t) => SystemTime::now().duration_since(t).unwrap_or_default(),
            // Released between our attempt and this look: try again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(path, e)),
        };
        let holder = read_holder(path);
        // A file being written right now has no holder yet: give its writer a moment.
        let age_limit = if holder.is_none() {
            stale_after.min(Duration::from_secs(10))
        } else {
            stale_after
        };
        match stale_reason(holder.as_ref(), age, age_limit) {
            None => match holder {
                Some(h) => return Ok(Acquired::Busy(h)),
                None => {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            },
            Some(_) => break_stale(path, holder.as_ref(), &me.token)?,
        }
    }
    match read_holder(path) {
        Some(h) => Ok(Acquired::Busy(h)),
        None => Err(Error::file(
            path,
            "cannot take this lock (it keeps changing hands or cannot be read); remove it if no process uses it",
        )),
    }
}

fn create_exclusive(path: &Path, me: &Holder) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    f.write_all(&serde_json::to_vec_pretty(me).expect("serialisable"))?;
    f.sync_all()
}

/// Sets a stale lock aside by renaming it, and deletes it if it is the one judged stale; a lock that changed
/// hands in between (a fresh one) is put back.
fn break_stale(path: &Path, judged: Option<&Holder>, my_token: &str) -> Result<()> {
    let aside = path.with_file_name(format!(
        "{}.stale-{my_token}",
        path.file_name()
            .map_or("lock".into(), |n| n.to_string_lossy())
    ));
    match std::fs::rename(path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path, e)),
    }
    let moved = read_holder(&aside);
    if moved.as_ref().map(|h| &h.token) != judged.map(|h| &h.token) {
        // Someone took the lock after we judged it: give it back unless the place is taken again.
        let _ = std::fs::hard_link(&aside, path);
    }
    std::fs::remove_file(&aside).map_err(|e| io_err(&aside, e))
}

fn start_heartbeat(
    path: &Path,
    me: Holder,
    stale_after: Duration,
    on_loss: Option<CancelToken>,
) -> CaseLock {
    let (stop, stopped) = mpsc::channel::<()>();
    let lost = Arc::new(AtomicBool::new(false));
    let interval = (stale_after / 4).max(Duration::from_millis(250));
    let (p, token, flag) = (path.to_path_buf(), me.token.clone(), lost.clone());
    let heartbeat = std::thread::Builder::new()
        .name("case-lock-heartbeat".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                let ours = read_holder(&p).is_some_and(|h| h.token == token);
                let touched = ours
                    && std::fs::OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .and_then(|f| f.set_modified(SystemTime::now()))
                        .is_ok();
                if !touched {
                    flag.store(true, Ordering::SeqCst);
                    if let Some(c) = &on_loss {
                        c.cancel();
                    }
                    return;
                }
            }
        })
        .ok();
    CaseLock {
        path: path.to_path_buf(),
        token: me.token,
        lost,
        stop: Some(stop),
        heartbeat,
    }
}

/// What [`for_each_locked`] hands the visitor for an item.
pub enum Turn<'a> {
    /// The item's lock is held (until the visit returns); `cancel` is also cancelled if the lock is lost.
    Held {
        lock: &'a CaseLock,
        cancel: &'a CancelToken,
    },
    /// Another live process holds the item's lock (reported once); the item is visited again at the end.
    Busy(&'a Holder),
}

/// How [`for_each_locked`] locks.
#[derive(Clone, Debug)]
pub struct LockOptions {
    /// Recorded in each lock (e.g. "shard 1/3 (Slurm array job 77, task 1)").
    pub owner: String,
    pub stale_after: Duration,
    /// How often to look again at items another process holds.
    pub poll: Duration,
}

impl Default for LockOptions {
    fn default() -> Self {
        Self {
            owner: format!("stylediff on {}", crate::util::host_name()),
            stale_after: Duration::from_secs(180),
            poll: Duration::from_secs(5),
        }
    }
}

/// Visits every item under its lock: items whose lock another live process holds are left to the end, then
/// waited for (looked at again every `poll`, until their holder releases them or goes stale), so that when this
/// returns every item has been visited with its lock held. Stops with [`Error::Cancelled`] when `cancel` is.
pub fn for_each_locked<T>(
    items: &[T],
    lock_path: impl Fn(&T) -> PathBuf,
    options: &LockOptions,
    cancel: &CancelToken,
    mut visit: impl FnMut(&T, Turn) -> Result<()>,
) -> Result<()> {
    let mut pass: Vec<&T> = items.iter().collect();
    let mut first_pass = true;
    while !pass.is_empty() {
        let mut busy = Vec::new();
        for item in pass {
            cancel.check()?;
            let item_cancel = cancel.child();
            match acquire(
                &lock_path(item),
                &options.owner,
                options.stale_after,
                Some(item_cancel.clone()),
            )? {
                Acquired::Held(lock) => visit(
                    item,
                    Turn::Held {
                        lock: &lock,
                        cancel: &item_cancel,
                    },
                )?,
                Acquired::Busy(holder) => {
                    if first_pass {
                        visit(item, Turn::Busy(&holder))?;
                    }
                    busy.push(item);
                }
            }
        }
        pass = busy;
        first_pass = false;
        if !pass.is_empty() {
            let until = std::time::Instant::now() + options.poll;
            while std::time::Instant::now() < until {
                cancel.check()?;
                std::thread::sleep(options.poll.min(Duration::from_millis(200)));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(a: Acquired) -> CaseLock {
        match a {
            Acquired::Held(l) => l,
            Acquired::Busy(h) => panic!("busy: {h}"),
        }
    }

    #[test]
    fn exclusive_then_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("case_1/.lock");
        let a = held(acquire(&path, "first", Duration::from_secs(60), None).unwrap());
        match acquire(&path, "second", Duration::from_secs(60), None).unwrap() {
            Acquired::Busy(h) => {
                assert_eq!(h.owner, "first");
                assert_eq!(h.pid, std::process::id());
            }
            Acquired::Held(_) => panic!("two holders"),
        }
        drop(a);
        assert!(!path.exists(), "released on drop");
        held(acquire(&path, "second", Duration::from_secs(60), None).unwrap());
    }

    #[test]
    fn a_dead_holder_on_this_machine_is_recovered_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".lock");
        // A process that has exited: its pid no longer exists (or is another process's, with another start time).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let ghost = Holder {
            token: "ghost".into(),
            host: crate::util::host_name(),
            pid: dead,
            boot: boot_id(),
            process_start: "1".into(),
            pid_namespace: pid_namespace(),
            owner: "a killed task".into(),
            since: 0,
        };
        std::fs::write(&path, serde_json::to_vec(&ghost).unwrap()).unwrap();
        let lock = held(acquire(&path, "requeued", Duration::from_secs(3600), None).unwrap());
        assert_eq!(read_holder(&path).unwrap().owner, "requeued");
        assert!(!lock.lost());
    }

    #[test]
    fn a_holder_in_another_pid_namespace_is_judged_by_its_heartbeat_only() {
        // A container on this machine with the host's name: its pids mean nothing here.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".lock");
        let neighbour = Holder {
            token: "container".into(),
            host: crate::util::host_name(),
            pid: u32::MAX - 1,
            boot: boot_id(),
            process_start: "1".into(),
            pid_namespace: "pid:[1]".into(),
            owner: "shard 0/2 in a container".into(),
            since: 0,
        };
        std::fs::write(&path, serde_json::to_vec(&neighbour).unwrap()).unwrap();
        assert!(matches!(
            acquire(&path, "me", Duration::from_secs(3600), None).unwrap(),
            Acquired::Busy(h) if h.token == "container"
        ));
    }

    #[test]
    fn a_silent_holder_elsewhere_is_stale_after_the_limit_and_a_taker_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".lock");
        let other = Holder {
            token: "far".into(),
            host: "another-node".into(),
            pid: 1,
            boot: "x".into(),
            process_start: "1".into(),
            pid_namespace: String::new(),
            owner: "shard 1/3".into(),
            since: 0,
        };
        std::fs::write(&path, serde_json::to_vec(&other).unwrap()).unwrap();
        assert!(matches!(
            acquire(&path, "me", Duration::from_secs(3600), None).unwrap(),
            Acquired::Busy(h) if h.host == "another-node"
        ));
        let old = SystemTime::now() - Duration::from_secs(120);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let cancel = CancelToken::new();
        let lock = held(
            acquire(
                &path,
                "me",
                Duration::from_millis(400),
                Some(cancel.clone()),
            )
            .unwrap(),
        );
        assert_eq!(read_holder(&path).unwrap().owner, "me");
        // Another process judges it stale in turn and takes it: the heartbeat notices and cancels our work.
        std::fs::write(&path, serde_json::to_vec(&other).unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(900));
        assert!(lock.lost() && cancel.is_cancelled());
        drop(lock);
        assert_eq!(
            read_holder(&path).unwrap().token,
            "far",
            "a lost lock is not removed"
        );
    }

    #[test]
    fn a_live_heartbeat_keeps_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".lock");
        let _lock = held(acquire(&path, "me", Duration::from_millis(800), None).unwrap());
        std::thread::sleep(Duration::from_millis(2000));
        // Older than the limit since acquisition, but the heartbeat kept it fresh.
        assert!(matches!(
            acquire(&path, "other", Duration::from_millis(800), None).unwrap(),
            Acquired::Busy(_)
        ));
    }
}
