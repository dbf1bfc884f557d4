//! 3x3 stride-1 convolution by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for
//! Convolutional Neural Networks", 2016): each 4x4 block of outputs comes from a 6x6 block of inputs with 36
//! multiplications per input and output channel pair instead of 144, so the matrix products, nearly all of a
//! UNet or VAE layer's time, shrink 4x. The price is a transform of the kernel, the inputs and the outputs (adds
//! and a few constant multiplications, linear in the data) and slightly larger rounding errors than the direct
//! product (still about 1e-6 of the largest output in f32: see the tests).
//!
//! With `U` the transformed kernel and `V` the transformed input tiles, each of the 36 points of the 6x6 transform
//! is one independent matrix product `M[xi] = U[xi] (c_out x c_in) * V[xi] (c_in x tiles)`; the outputs are
//! `A^T M A` per tile. Tiles are taken in blocks of whole tile rows so that `V` and `M` stay cache-sized.

use rayon::prelude::*;

use crate::model::fused_attention::{Threads, matmul};

/// Output tile side.
const TILE: usize = 4;
/// Input tile side: the output tile plus the kernel's reach.
const ALPHA: usize = TILE + 2;
/// Points of the 6x6 transform: one matrix product each.
const POINTS: usize = ALPHA * ALPHA;
/// Bytes of transformed inputs and outputs per block.
const BLOCK_BYTES: usize = 16 << 20;

/// A 3x3, stride-1 convolution's sizes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Conv3x3 {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub padding: usize,
}

impl Conv3x3 {
    fn out_h(&self) -> usize {
        self.h + 2 * self.padding - 2
    }

    fn out_w(&self) -> usize {
        self.w + 2 * self.padding - 2
    }

    fn tiles_y(&self) -> usize {
        self.out_h().div_ceil(TILE)
    }

    fn tiles_x(&self) -> usize {
        self.out_w().div_ceil(TILE)
    }

    /// Whether the transforms pay for themselves: enough channels that the products dominate, and at least 64
    /// output tiles over the batch (a 32x32 output at batch 1). The transformed kernel is 4x the kernel's size and
    /// is built and read once per call, so with fewer tiles (the UNet's 1280-channel layers at 16x16 and 8x8) the
    /// direct product is faster (docs/performance.md, lab note 17).
    pub fn worthwhile(&self) -> bool {
        self.c_in >= 16 && self.c_out >= 16 && self.batch * self.tiles_y() * self.tiles_x() >= 64
    }
}

/// Eight values side by side (eight tiles, or eight channels of the kernel): the transforms are the same linear
/// maps for every tile, so they run on eight at a time, which the compiler turns into vector instructions.
#[derive(Clone, Copy, Debug, Default)]
struct Lanes([f32; LANES]);

const LANES: usize = 8;

impl Lanes {
    #[inline(always)]
    fn zip(self, other: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        Self(std::array::from_fn(|l| f(self.0[l], other.0[l])))
    }
}

impl std::ops::Add for Lanes {
    type Output = Self;
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        self.zip(other, |a, b| a + b)
    }
}

impl std::ops::Sub for Lanes {
    type Output = Self;
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        self.zip(other, |a, b| a - b)
    }
}

impl std::ops::Mul<f32> for Lanes {
    type Output = Self;
    #[inline(always)]
    fn mul(self, c: f32) -> Self {
        Self(self.0.map(|a| a * c))
    }
}

impl std::ops::Neg for Lanes {
    type Output = Self;
    #[inline(always)]
    fn neg(self) -> Self {
        Self(self.0.map(|a| -a))
    }
}

/// `G g` for one kernel row or column `g` (3 taps -> 6 points).
#[inline(always)]
fn kernel_1d(g: [Lanes; 3]) -> [Lanes; ALPHA] {
    // Multiplications by the reciprocals: divisions would dominate the kernel transform's time.
    const SIXTH: f32 = 1.0 / 6.0;
    let (a, b) = (g[0] + g[2], g[1]);
    let c = g[0] * (1.0 / 24.0) + g[2] * SIXTH;
    [
        g[0] * 0.25,
        -(a + b) * SIXTH,
        -(a - b) * SIXTH,
        c + g[1] * (1.0 / 12.0),
        c - g[1] * (1.0 / 12.0),
        g[2],
    ]
}

/// `B^T d` for one input row or column `d` (6 values -> 6 points).
#[inline(always)]
fn input_1d(d: [Lanes; ALPHA]) -> [Lanes; ALPHA] {
    [
        d[0] * 4.0 - d[2] * 5.0 + d[4],
        d[3] + d[4] - (d[1] + d[2]) * 4.0,
        (d[1] - d[2]) * 4.0 - d[3] + d[4],
        (d[3] - d[1]) * 2.0 - d[2] + d[4],
        (d[1] - d[3]) * 2.0 - d[2] + d[4],
        d[1] * 4.0 - d[3] * 5.0 + d[5],
    ]
}

/// `A^T m` for one row or column of products `m` (6 points -> 4 outputs).
#[inline(always)]
fn output_1d(m: [Lanes; ALPHA]) -> [Lanes; TILE] {
    let (s12, d12, s34, d34) = (m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]);
    [
        m[0] + s12 + s34,
        d12 + d34 * 2.0,
        s12 + s34 * 4.0,
        d12 + d34 * 8.0 + m[5],
    ]
}

/// The 2-D transform `T X T^T` of a square block (columns then rows), given the 1-D transform `t`.
#[inline(always)]
fn transform_2d<const N: usize, const M: usize>(
    x: &[[Lanes; N]; N],
    t: impl Fn([Lanes; N]) -> [Lanes; M],
) -> [[Lanes; M]; M] {
    let mut columns = [[Lanes::default(); N]; M];
    for j in 0..N {
        let column = t(std::array::from_fn(|i| x[i][j]));
        for i in 0..M {
            columns[i][j] = column[i];
        }
    }
    let mut out = [[Lanes::default(); M]; M];
    for i in 0..M {
        out[i] = t(columns[i]);
    }
    out
}

/// Runs `f` compiled for AVX2 + FMA where the CPU has them (the lane arithmetic then uses 8-wide registers), as
/// plain x86-64 elsewhere. Both compute the same operations in the same order (no contraction into FMAs).
#[inline(always)]
fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// The kernel `c_out x c_in x 3 x 3` transformed to `c_out x POINTS x c_in`: for each output channel, one
/// `c_in`-long row per transform point.
fn transform_kernel(s: &Conv3x3, k: &[f32]) -> Vec<f32> {
    let mut u = vec![0f32; s.c_out * POINTS * s.c_in];
    u.par_chunks_mut(POINTS * s.c_in)
        .zip(k.par_chunks(s.c_in * 9))
        .for_each(|(u, k)| {
            vectorised(|| {
                for ci0 in (0..s.c_in).step_by(LANES) {
                    let lanes = LANES.min(s.c_in - ci0);
                    let g: [[Lanes; 3]; 3] = std::array::from_fn(|i| {
                        std::array::from_fn(|j| {
                            let mut v = Lanes::default();
                            for l in 0..lanes {
                                v.0[l] = k[(ci0 + l) * 9 + 3 * i + j];
                            }
                            v
                        })
                    });
                    let points = transform_2d(&g, kernel_1d);
                    for (xi, p) in points.iter().flatten().enumerate() {
                        u[xi * s.c_in + ci0..][..lanes].copy_from_slice(&p.0[..lanes]);
                    }
                }
            })
        });
    u
}

/// One input channel's tiles of global tile rows `[row0, row0 + rows)` (tile row `r` of sample `n` is global row
/// `n * tiles_y + r`), transformed into `v`, `POINTS x tiles` (tile index `local row * tiles_x + tile column`).
fn transform_input(s: &Conv3x3, x: &[f32], c: usize, row0: usize, rows: usize, v: &mut [f32]) {
    let (tiles_x, tiles_y, plane) = (s.tiles_x(), s.tiles_y(), s.h * s.w);
    let tiles = rows * tiles_x;
    for t0 in (0..tiles).step_by(LANES) {
        let lanes = LANES.min(tiles - t0);
        let mut d = [[Lanes::default(); ALPHA]; ALPHA];
        for l in 0..lanes {
            let (local, tx) = ((t0 + l) / tiles_x, (t0 + l) % tiles_x);
            let (n, ty) = ((row0 + local) / tiles_y, (row0 + local) % tiles_y);
            let image = &x[(n * s.c_in + c) * plane..][..plane];
            // Top-left input coordinate of the tile, in padded coordinates.
            let (y0, x0) = (ty * TILE, tx * TILE);
            let inside = y0 >= s.padding
                && x0 >= s.padding
                && y0 + ALPHA <= s.h + s.padding
                && x0 + ALPHA <= s.w + s.padding;
            for (i, row) in d.iter_mut().enumerate() {
                if inside {
                    let line = &image[(y0 + i - s.padding) * s.w + x0 - s.padding..][..ALPHA];
                    for (j, value) in row.iter_mut().enumerate() {
                        value.0[l] = line[j];
                    }
                } else {
                    let y = (y0 + i).wrapping_sub(s.padding);
                    for (j, value) in row.iter_mut().enumerate() {
                        let x = (x0 + j).wrapping_sub(s.padding);
                        value.0[l] = if y < s.h && x < s.w {
                            image[y * s.w + x]
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
        let points = transform_2d(&d, input_1d);
        for (xi, p) in points.iter().flatten().enumerate() {
            v[xi * tiles + t0..][..lanes].copy_from_slice(&p.0[..lanes]);
        }
    }
}

/// Output plane `plane` (sample `n`, channel `k`) for the tile rows of the block that belong to sample `n`, from the
/// block's products `m` (`POINTS x c_out x tiles`), plus the channel's bias.
fn transform_output(
    s: &Conv3x3,
    m: &[f32],
    (row0, rows): (usize, usize),
    (n, k): (usize, usize),
    bias: f32,
    out: &mut [f32],
) {
    let (tiles_x, tiles_y, ow, oh) = (s.tiles_x(), s.tiles_y(), s.out_w(), s.out_h());
    let tiles = rows * tiles_x;
    // This sample's tiles in the block.
    let first = (n * tiles_y).max(row0) - row0;
    let last = ((n + 1) * tiles_y).min(row0 + rows) - row0;
    let sample_tiles = first * tiles_x..last * tiles_x;
    for t0 in sample_tiles.clone().step_by(LANES) {
        let lanes = LANES.min(sample_tiles.end - t0);
        let products: [[Lanes; ALPHA]; ALPHA] = std::array::from_fn(|i| {
            std::array::from_fn(|j| {
                let mut v = Lanes::default();
                v.0[..lanes]
                    .copy_from_slice(&m[((i * ALPHA + j) * s.c_out + k) * tiles + t0..][..lanes]);
                v
            })
        });
        let y = transform_2d(&products, output_1d);
        for l in 0..lanes {
            let (local, tx) = ((t0 + l) / tiles_x, (t0 + l) % tiles_x);
            let (y0, x0) = (((row0 + local) % tiles_y) * TILE, tx * TILE);
            let cols = TILE.min(ow - x0);
            for (i, row) in y.iter().enumerate().take(TILE.min(oh - y0)) {
                let dst = &mut out[(y0 + i) * ow + x0..][..cols];
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = row[j].0[l] + bias;
                }
            }
        }
    }
}

/// The convolution of contiguous input planes `x` (`batch x c_in x h x w`) with the kernel `k` (`c_out x c_in x 3
/// x 3`), plus one `bias` per output channel when given; `batch x c_out x out_h x out_w`.
pub(crate) fn forward(s: &Conv3x3, x: &[f32], k: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    forward_in_blocks(s, x, k, bias, BLOCK_BYTES)
}

/// [`forward`] with at most `block_bytes` of transformed inputs and outputs per block (at least one tile row).
fn forward_in_blocks(
    s: &Conv3x3,
    x: &[f32],
    k: &[f32],
    bias: Option<&[f32]>,
    block_bytes: usize,
) -> Vec<f32> {
    let u = transform_kernel(s, k);
    let (tiles_x, tile_rows) = (s.tiles_x(), s.batch * s.tiles_y());
    let plane = s.out_h() * s.out_w();
    let mut out = vec![0f32; s.batch * s.c_out * plane];
    let bytes_per_tile = POINTS * (s.c_in + s.c_out) * std::mem::size_of::<f32>();
    let rows_per_block = (block_bytes / (bytes_per_tile * tiles_x)).clamp(1, tile_rows);
    let (mut v, mut m) = (Vec::new(), Vec::new());
    for row0 in (0..tile_rows).step_by(rows_per_block) {
        let rows = rows_per_block.min(tile_rows - row0);
        let tiles = rows * tiles_x;
        v.resize(s.c_in * POINTS * tiles, 0f32);
        m.resize(POINTS * s.c_out * tiles, 0f32);
        v.par_chunks_mut(POINTS * tiles)
            .enumerate()
            .for_each(|(c, v)| vectorised(|| transform_input(s, x, c, row0, rows, v)));
        m.par_chunks_mut(s.c_out * tiles)
            .enumerate()
            .for_each(|(xi, m)| {
                matmul(
                    m,
                    (s.c_out, tiles, s.c_in),
                    &u[xi * s.c_in..],
                    (POINTS * s.c_in, 1),
                    &v[xi * tiles..],
                    (POINTS * tiles, 1),
                    false,
                    Threads::One,
                )
            });
        let samples = row0 / s.tiles_y()..(row0 + rows).div_ceil(s.tiles_y());
        out.par_chunks_mut(plane)
            .enumerate()
            .filter(|(p, _)| samples.contains(&(p / s.c_out)))
            .for_each(|(p, out)| {
                let (n, k) = (p / s.c_out, p % s.c_out);
                let b = bias.map_or(0.0, |b| b[k]);
                vectorised(|| transform_output(s, &m, (row0, rows), (n, k), b, out));
            });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct definition: `out[n][k][y][x] = sum over c, i, j of x[n][c][y + i - p][x + j - p] k[k][c][i][j]`,
    /// accumulated in f64.
    fn direct(s: &Conv3x3, x: &[f32], k: &[f32], bias: &[f32]) -> Vec<f64> {
        let (oh, ow) = (s.out_h(), s.out_w());
        let mut out = vec![0f64; s.batch * s.c_out * oh * ow];
        for n in 0..s.batch {
            for ko in 0..s.c_out {
                for y in 0..oh {
                    for xo in 0..ow {
                        let mut acc = bias[ko] as f64;
                        for c in 0..s.c_in {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let (iy, ix) = (
                                        (y + i).wrapping_sub(s.padding),
                                        (xo + j).wrapping_sub(s.padding),
                                    );
                                    if iy < s.h && ix < s.w {
                                        acc += x[((n * s.c_in + c) * s.h + iy) * s.w + ix] as f64
                                            * k[((ko * s.c_in + c) * 3 + i) * 3 + j] as f64;
                                    }
                                }
                            }
                        }
                        out[((n * s.c_out + ko) * oh + y) * ow + xo] = acc;
                    }
                }
            }
        }
        out
    }

    /// Deterministic values in [-1, 1) from a 64-bit LCG (stable across releases).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_the_direct_convolution_in_every_tile_and_padding() {
        // Edge tiles cut by the image's end, several samples in one block and blocks split across samples, no
        // padding and padding 2.
        for (i, s) in [
            (2, 3, 9, 11, 5, 1),
            (1, 4, 8, 8, 2, 1),
            (3, 2, 13, 6, 3, 0),
            (2, 3, 7, 10, 4, 2),
            (1, 16, 24, 20, 24, 1),
        ]
        .into_iter()
        .enumerate()
        {
            let s = Conv3x3 {
                batch: s.0,
                c_in: s.1,
                h: s.2,
                w: s.3,
                c_out: s.4,
                padding: s.5,
            };
            let x = values(s.batch * s.c_in * s.h * s.w, 3 * i as u64);
            let k = values(s.c_out * s.c_in * 9, 3 * i as u64 + 1);
            let bias = values(s.c_out, 3 * i as u64 + 2);
            let fast = forward(&s, &x, &k, Some(&bias));
            let reference = direct(&s, &x, &k, &bias);
            assert_eq!(fast.len(), reference.len(), "{s:?}");
            let scale = reference.iter().fold(0f64, |a, v| a.max(v.abs()));
            let err = fast
                .iter()
                .zip(&reference)
                .fold(0f64, |a, (&f, &r)| a.max((f as f64 - r).abs()));
            eprintln!("{s:?}: {:e}", err / scale);
            assert!(
                err / scale < 1e-5,
                "{s:?}: off by {:e} of the largest output",
                err / scale
            );
        }
    }

    #[test]
    fn blocks_of_any_size_give_the_same_outputs() {
        // One tile row per block (so blocks end inside a sample) and two, against the whole batch in one block.
        let s = Conv3x3 {
            batch: 3,
            c_in: 20,
            h: 10,
            w: 14,
            c_out: 18,
            padding: 1,
        };
        let x = values(s.batch * s.c_in * s.h * s.w, 7);
        let k = values(s.c_out * s.c_in * 9, 8);
        let bias = values(s.c_out, 9);
        let whole = forward_in_blocks(&s, &x, &k, Some(&bias), usize::MAX / 2);
        let row = POINTS * (s.c_in + s.c_out) * 4 * s.tiles_x();
        for block_bytes in [1, 2 * row] {
            let split = forward_in_blocks(&s, &x, &k, Some(&bias), block_bytes);
            let reference = direct(&s, &x, &k, &bias);
            let scale = reference.iter().fold(0f64, |a, v| a.max(v.abs()));
            for (a, b) in split.iter().zip(&whole) {
                assert!(
                    ((a - b).abs() as f64) / scale < 1e-6,
                    "{block_bytes} bytes per block"
                );
            }
        }
    }
}
