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

/// glibc hands every freed block above 128 KiB back to the kernel and maps a fresh one for the next tensor, so
/// each op's output page-faults on first touch (about 10% of a toy training step). Keeping freed memory in the
/// heap lets the next op of the same size reuse it. One arena for all threads: a second thread's arena lives in
/// heaps that glibc unmaps whenever they empty, whatever the trim threshold, and two training stages side by side
/// then spent a quarter of their time in the kernel faulting pages back in and flushing the other core's TLB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only tunes the allocator; it is called before any allocation-heavy work and any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
