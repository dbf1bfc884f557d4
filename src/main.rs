mod cli;

fn main() {
    pin_thread_count();
    keep_freed_memory();
    if let Err(e) = cli::run() {
        eprintln!("error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text the message already holds (an I/O
/// error wrapped with its path would otherwise print the OS error twice).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// candle asks for its thread count on every CPU matmul, and without `RAYON_NUM_THREADS` that means parsing
/// /proc/cpuinfo each time (hundreds of thousands of times in an inversion: 3x the run time on the toy model).
/// Fixing the variable once, to the count candle picks itself, removes that cost.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: first statement of main, before any thread exists, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}

/// glibc hands large freed blocks back to the kernel (every block over 32 MiB, always, whatever the threshold) and
/// maps fresh zeroed pages for the next tensor of the same size, so each op's output page-faults on first touch:
/// at SD size that was over a quarter of a UNet forward+backward (docs/performance.md). Serving every block from
/// the heap and never trimming it lets the next op reuse the memory; the resident size stays at the run's peak.
/// One arena for all threads: a second thread's arena lives in heaps that glibc unmaps whenever they empty.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only tunes the allocator; it is called before any allocation-heavy work and any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
