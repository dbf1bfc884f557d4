mod cli;

fn main() {
    pin_thread_count();
    if let Err(e) = cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
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
