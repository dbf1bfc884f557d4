//! Process settings that make the CPU engine fast, in one place. Call [`tune`] first thing in `main`, before any
//! thread starts (the CLI does); a library user embedding stylediff gets the same speed by doing the same.
//!
//! - candle asks for its thread count on every CPU matmul, and without `RAYON_NUM_THREADS` that means parsing
//!   /proc/cpuinfo each time (hundreds of thousands of times in an inversion: 3x the run time on the toy model).
//!   Fixing the variable once, to the count candle picks itself, removes that cost.
//! - glibc hands large freed blocks back to the kernel (every block over 32 MiB, always, whatever the threshold)
//!   and maps fresh zeroed pages for the next tensor of the same size, so each op's output page-faults on first
//!   touch: at SD size that was over a quarter of a UNet forward+backward (docs/performance.md). Serving every
//!   block from the heap and never trimming it lets the next op reuse the memory; the resident size stays at the
//!   run's peak until [`release_free_memory`] hands it back. One arena for all threads: a second thread's arena
//!   lives in heaps that glibc unmaps whenever they empty.

/// Applies every setting. Call it before any other thread exists (it sets an environment variable).
pub fn tune() {
    pin_thread_count();
    keep_freed_memory();
}

/// Runs `work` on a worker thread of the engine's thread pool and waits for it. The engine's parallel ops then
/// start from a worker, which shares out the work and joins in, instead of from an outside thread that hands each
/// op to the pool and sleeps until it is done (a futex round trip per op: most of a small model's time), and the
/// pool's threads no longer share the cores with a third, waiting thread. Already on a rayon worker (of any pool),
/// `work` runs right here. The editing API ([`crate::Editor`]) and the benchmarks call it themselves.
pub fn on_worker_thread<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return work();
    }
    match engine_pool() {
        Some(pool) => pool.install(work),
        None => work(),
    }
}

/// As many threads as candle uses, with a main thread's stack (the backward pass walks deep graphs recursively;
/// rayon's threads default to 2 MiB).
fn engine_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(candle_core::utils::get_num_threads())
            .stack_size(64 << 20)
            .thread_name(|i| format!("stylediff-engine-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: `tune` is documented to run before any thread exists, so nothing reads the environment
        // concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only tunes the allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // -1: never trim (mallopt(3)). A threshold, however high, still returns the activations of a
        // forward+backward (several GB, freed together at its end) and the next pass clears them again.
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        // Grow the heap 64 MiB at a time rather than by each request's size.
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

/// Hands the memory the allocator keeps for reuse back to the system: with [`tune`] the resident size otherwise
/// stays at the largest peak so far. For a long-lived process between jobs (the studio does it after each one) and
/// for benchmarks that measure each part's own peak; costs page clearing on the next large pass.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Asks the kernel to back `buffer` with 2 MiB pages where it can (transparent huge pages in `madvise` mode, the
/// common default): filling gigabytes of fresh memory then takes one page fault per 2 MiB instead of per 4 KiB.
pub fn advise_huge_pages<T>(buffer: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = buffer.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buffer);
        let aligned = start.next_multiple_of(PAGE);
        if end > aligned + (2 << 20) {
            // SAFETY: the range lies inside `buffer`; the advice changes only how its pages are backed.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    (end - aligned) / PAGE * PAGE,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_an_engine_worker_and_nested_work_stays_on_it() {
        assert!(
            rayon::current_thread_index().is_none(),
            "tests start outside any pool"
        );
        let (name, inner_same_thread, value) = on_worker_thread(|| {
            let outer = std::thread::current().id();
            let name = std::thread::current().name().map(str::to_string);
            let inner = on_worker_thread(|| std::thread::current().id());
            (name, inner == outer, 41 + 1)
        });
        assert!(name.unwrap_or_default().starts_with("stylediff-engine-"));
        assert!(inner_same_thread);
        assert_eq!(value, 42);
        // Work that is already on a worker of another pool stays in that pool.
        let other = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "other-pool".into())
            .build()
            .unwrap();
        let name = other
            .install(|| on_worker_thread(|| std::thread::current().name().map(str::to_string)));
        assert_eq!(name.as_deref(), Some("other-pool"));
    }

    #[test]
    fn a_deep_graph_differentiates_on_the_workers_stack() -> candle_core::Result<()> {
        // candle walks the graph recursively; a chain this long overflows a default 2 MiB thread stack.
        const DEPTH: usize = 100_000;
        let x = candle_core::Var::new(1f32, &candle_core::Device::Cpu)?;
        let grad = on_worker_thread(|| -> candle_core::Result<f32> {
            let mut y = x.as_tensor().clone();
            for _ in 0..DEPTH {
                y = (y + x.as_tensor())?;
            }
            let grads = y.backward()?;
            grads
                .get(x.as_tensor())
                .expect("x is tracked")
                .to_scalar::<f32>()
        })?;
        assert_eq!(grad, (DEPTH + 1) as f32);
        Ok(())
    }
}
