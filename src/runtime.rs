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
