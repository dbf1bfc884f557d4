//! The studio's job queue: one worker thread owns the loaded model and runs jobs one at a time, in the order they
//! came; a bounded queue refuses more than it can hold (the server answers 503). Every job keeps its progress
//! events in order, its status and its result, so any number of pages can follow it by polling; cancelling sets
//! the job's token, checked before every UNet evaluation. Results are written by the store only when a job
//! succeeds, so a failed or cancelled job leaves no files.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use super::store::Store;
use crate::{
    CancelToken, EditSettings, Editor, Error, InversionSettings, Monitor, Progress, Result,
};

/// What a job does.
pub enum Work {
    Invert {
        photo: image::RgbImage,
        prompt: String,
        settings: InversionSettings,
    },
    Edit {
        inversion: String,
        settings: EditSettings,
    },
    Maps {
        inversion: String,
        prompt: Option<String>,
    },
}

impl Work {
    fn kind(&self) -> &'static str {
        match self {
            Self::Invert { .. } => "invert",
            Self::Edit { .. } => "edit",
            Self::Maps { .. } => "maps",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

/// A job as the API shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct JobView {
    pub id: String,
    pub kind: &'static str,
    pub status: Status,
    /// Jobs ahead of this one while it is queued.
    pub position: Option<usize>,
    /// Progress events from `since` on, in order.
    pub events: Vec<Progress>,
    /// The index to ask from next time.
    pub next: usize,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
}

struct Job {
    kind: &'static str,
    status: Status,
    events: Vec<Progress>,
    result: Option<serde_json::Value>,
    error: Option<String>,
    cancel: CancelToken,
    order: u64,
}

#[derive(Default)]
struct Registry {
    jobs: HashMap<String, Job>,
    next_order: u64,
}

/// The queue and the record of every job since the server started.
#[derive(Clone)]
pub struct Jobs {
    registry: Arc<Mutex<Registry>>,
    sender: SyncSender<(String, Work)>,
}

impl Jobs {
    /// Starts the worker with `editor` and a queue of at most `capacity` waiting jobs.
    pub fn start(editor: Arc<Editor>, store: Arc<Store>, capacity: usize) -> Self {
        let (sender, receiver) = std::sync::mpsc::sync_channel(capacity);
        let registry = Arc::new(Mutex::new(Registry::default()));
        let worker_registry = registry.clone();
        std::thread::Builder::new()
            .name("stylediff-worker".into())
            .spawn(move || worker(editor, store, receiver, worker_registry))
            .expect("the worker thread starts");
        Self { registry, sender }
    }

    /// Queues `work`; `Err(Full)` when the queue is full.
    pub fn submit(&self, work: Work) -> std::result::Result<String, QueueFull> {
        let mut reg = self.registry.lock().expect("job registry");
        let order = reg.next_order;
        reg.next_order += 1;
        let id = super::store::id_of(&("job", order, std::process::id(), now_nanos()));
        let kind = work.kind();
        match self.sender.try_send((id.clone(), work)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                return Err(QueueFull);
            }
        }
        // Keep the record of at most MAX_FINISHED ended jobs: the oldest go first.
        let ended: Vec<(u64, String)> = {
            let mut e: Vec<(u64, String)> = reg
                .jobs
                .iter()
                .filter(|(_, j)| {
                    matches!(j.status, Status::Done | Status::Failed | Status::Cancelled)
                })
                .map(|(k, j)| (j.order, k.clone()))
                .collect();
            e.sort();
            e
        };
        for (_, old) in ended.iter().take(ended.len().saturating_sub(MAX_FINISHED)) {
            reg.jobs.remove(old);
        }
        reg.jobs.insert(
            id.clone(),
            Job {
                kind,
                status: Status::Queued,
                events: Vec::new(),
                result: None,
                error: None,
                cancel: CancelToken::new(),
                order,
            },
        );
        Ok(id)
    }

    /// The job's state with its events from `since`; `None` for an unknown id.
    pub fn view(&self, id: &str, since: usize) -> Option<JobView> {
        let reg = self.registry.lock().expect("job registry");
        let job = reg.jobs.get(id)?;
        let position = (job.status == Status::Queued).then(|| {
            reg.jobs
                .values()
                .filter(|j| {
                    j.order < job.order && matches!(j.status, Status::Queued | Status::Running)
                })
                .count()
        });
        let since = since.min(job.events.len());
        Some(JobView {
            id: id.to_string(),
            kind: job.kind,
            status: job.status,
            position,
            events: job.events[since..].to_vec(),
            next: job.events.len(),
            result: job.result.clone(),
            error: job.error.clone(),
        })
    }

    /// Cancels a queued or running job; false for an unknown id.
    pub fn cancel(&self, id: &str) -> bool {
        let reg = self.registry.lock().expect("job registry");
        match reg.jobs.get(id) {
            Some(job) => {
                job.cancel.cancel();
                true
            }
            None => false,
        }
    }
}

/// Ended jobs whose record (events, result) is kept for pages to read.
const MAX_FINISHED: usize = 1000;

/// The queue holds as many jobs as it may.
#[derive(Debug)]
pub struct QueueFull;

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn worker(
    editor: Arc<Editor>,
    store: Arc<Store>,
    receiver: Receiver<(String, Work)>,
    registry: Arc<Mutex<Registry>>,
) {
    for (id, work) in receiver {
        let cancel = {
            let mut reg = registry.lock().expect("job registry");
            let Some(job) = reg.jobs.get_mut(&id) else {
                continue;
            };
            if job.cancel.is_cancelled() {
                job.status = Status::Cancelled;
                continue;
            }
            job.status = Status::Running;
            job.cancel.clone()
        };
        let events = registry.clone();
        let progress_id = id.clone();
        let mut monitor = Monitor::new(move |p| {
            if let Some(job) = events
                .lock()
                .expect("job registry")
                .jobs
                .get_mut(&progress_id)
            {
                job.events.push(*p);
            }
        })
        .with_cancel(cancel);
        // A panic in a job fails that job, not the server.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(&editor, &store, work, &mut monitor)
        }))
        .unwrap_or_else(|_| Err(Error::invalid("job", "stopped by an internal error")));
        drop(monitor);
        // An idle server should not hold a finished inversion's working memory (gigabytes at SD size).
        crate::runtime::release_free_memory();
        let mut reg = registry.lock().expect("job registry");
        if let Some(job) = reg.jobs.get_mut(&id) {
            match outcome {
                Ok(result) => {
                    job.status = Status::Done;
                    job.result = Some(result);
                }
                Err(Error::Cancelled) => job.status = Status::Cancelled,
                Err(e) => {
                    job.status = Status::Failed;
                    job.error = Some(e.to_string());
                }
            }
        }
    }
}

fn run(
    editor: &Editor,
    store: &Store,
    work: Work,
    monitor: &mut Monitor,
) -> Result<serde_json::Value> {
    let device = &editor.model().device;
    match work {
        Work::Invert {
            photo,
            prompt,
            settings,
        } => {
            let (inv, recon) =
                editor.invert_with_reconstruction(&photo, &prompt, &settings, monitor)?;
            let recon = crate::util::tensor_to_image(&recon)?;
            let id = store.save(&inv, &recon)?;
            Ok(serde_json::json!({ "inversion": id, "recon_psnr": inv.recon_psnr }))
        }
        Work::Edit {
            inversion,
            settings,
        } => {
            let inv = store.load(&inversion, device)?;
            let edited = editor.edit(&inv, &settings, monitor)?;
            let record = crate::outputs::edit_record(&inv, &settings);
            let edit = store.save_edit(&inversion, &edited.edited_image()?, &record)?;
            Ok(serde_json::json!({ "inversion": inversion, "edit": edit, "settings": record }))
        }
        Work::Maps { inversion, prompt } => {
            let inv = store.load(&inversion, device)?;
            let maps = editor.attention_maps(&inv, prompt.as_deref(), monitor)?;
            let mut tokens = Vec::new();
            for (k, label) in maps.labels.iter().enumerate() {
                let map = maps.token_map(k)?;
                let values: Vec<f32> = map.flatten_all()?.to_vec1()?;
                tokens.push(serde_json::json!({ "token": label, "map": values }));
            }
            Ok(serde_json::json!({
                "inversion": inversion,
                "prompt": prompt.unwrap_or(inv.source_prompt),
                "grid": [maps.grid.0, maps.grid.1],
                "tokens": tokens,
            }))
        }
    }
}
