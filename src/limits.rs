//! The documented limits of every number stylediff accepts, and the memory check made before a run.
//! `docs/reliability.md` lists them for users.

use crate::{Error, Result};

/// Inner optimisation iterations per step (the authors use 10 for null-text and K = 100 for StyleDiffusion).
pub const MAX_INNER_STEPS: usize = 1000;
/// Generated images: at most this many pixels along each side.
pub const MAX_SIDE: usize = 2048;
/// Input photos: at most this many pixels along each side, and this many bytes once decoded.
pub const MAX_INPUT_SIDE: u32 = 16384;
pub const MAX_INPUT_BYTES: u64 = 512 << 20;
/// Classifier-free guidance scale.
pub const MAX_GUIDANCE: f64 = 100.0;
/// Attention reweighting factor, either sign.
pub const MAX_REWEIGHT: f64 = 100.0;
/// Weight of StyleDiffusion's attention regularisation.
pub const MAX_ATTENTION_WEIGHT: f64 = 1e4;

/// `value`, when it is a finite number in `lo..=hi`; otherwise an error naming the setting.
pub fn finite_in(what: &'static str, value: f64, lo: f64, hi: f64) -> Result<f64> {
    if value.is_finite() && (lo..=hi).contains(&value) {
        Ok(value)
    } else {
        Err(Error::invalid(
            what,
            format!("{value}: must be a finite number between {lo} and {hi}"),
        ))
    }
}

/// A fraction of the steps, 0 to 1.
pub fn fraction(what: &'static str, value: f64) -> Result<f64> {
    finite_in(what, value, 0.0, 1.0)
}

/// A count in `lo..=hi`.
pub fn count_in(what: &'static str, value: usize, lo: usize, hi: usize) -> Result<usize> {
    if (lo..=hi).contains(&value) {
        Ok(value)
    } else {
        Err(Error::invalid(
            what,
            format!("{value}: must be between {lo} and {hi}"),
        ))
    }
}

/// Memory the system can still hand out (Linux `MemAvailable`); `None` where unknown.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Refuses a run whose estimated working memory exceeds what the system has free.
pub fn ensure_fits(what: &str, estimate: u64, device: &candle_core::Device) -> Result<()> {
    if !device.is_cpu() {
        return Ok(());
    }
    if let Some(free) = available_memory()
        && estimate > free
    {
        return Err(Error::invalid(
            "size",
            format!(
                "{what} needs about {} of working memory and this machine has {} free; use a smaller size",
                gib(estimate),
                gib(free)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_and_out_of_range_numbers_are_named() {
        assert_eq!(finite_in("guidance", 7.5, 0.0, 100.0).unwrap(), 7.5);
        for bad in [f64::NAN, f64::INFINITY, -1.0, 101.0] {
            let e = finite_in("guidance", bad, 0.0, 100.0)
                .unwrap_err()
                .to_string();
            assert!(e.contains("guidance"), "{e}");
        }
        assert!(count_in("steps", 0, 1, 10).is_err());
    }
}
