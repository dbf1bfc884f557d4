//! 2-D convolution on the CPU (f32, groups 1, dilation 1) as matrix products over chunks of output rows, forward
//! and backward.
//!
//! Each chunk's patch matrix (input values per patch entry x output positions of the chunk) stays small enough for
//! the cache and is multiplied with the kernel straight into the output; nothing the size of the whole patch
//! matrix is ever built (for a 512-pixel VAE layer that would be over a gigabyte), and 1x1 convolutions multiply
//! the input planes directly. Candle's own CPU convolution gathers patches with scalar loops and copies its
//! operands; this one took the SD v1.5 VAE encoder from 20 s to a few at 512x512 (docs/performance.md).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::model::fused::{contiguous_f32, with_f32};

use crate::model::fused_attention::{Threads, matmul};
use crate::model::winograd::{self, Conv3x3};

/// Patch-matrix elements per chunk (4 MiB of f32).
const CHUNK_ELEMENTS: usize = 1 << 20;

/// The shape of one 2-D convolution.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k_h: usize,
    k_w: usize,
    stride: usize,
    padding: usize,
}

impl Geometry {
    fn new(xs: &Shape, kernel: &Shape, stride: usize, padding: usize) -> Result<Self> {
        let (batch, c_in, h, w) = xs.dims4()?;
        let (c_out, k_c, k_h, k_w) = kernel.dims4()?;
        if k_c != c_in || stride == 0 || h + 2 * padding < k_h || w + 2 * padding < k_w {
            candle_core::bail!(
                "conv2d: input {:?} does not fit kernel {:?} at stride {stride}, padding {padding}",
                xs.dims(),
                kernel.dims()
            );
        }
        Ok(Self {
            batch,
            c_in,
            h,
            w,
            c_out,
            k_h,
            k_w,
            stride,
            padding,
        })
    }

    fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.k_h) / self.stride + 1
    }

    fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.k_w) / self.stride + 1
    }

    fn positions(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// Input values per patch: the rows of a patch matrix, ordered (channel, ky, kx) as the kernel's columns.
    fn patch_len(&self) -> usize {
        self.c_in * self.k_h * self.k_w
    }

    /// A 1x1, stride-1, unpadded convolution: the input planes are the patch matrix.
    fn pointwise(&self) -> bool {
        self.k_h == 1 && self.k_w == 1 && self.stride == 1 && self.padding == 0
    }

    /// The same convolution for Winograd's algorithm, where it applies (3x3, stride 1) and pays.
    fn winograd(&self) -> Option<Conv3x3> {
        let s = Conv3x3 {
            batch: self.batch,
            c_in: self.c_in,
            h: self.h,
            w: self.w,
            c_out: self.c_out,
            padding: self.padding,
        };
        (self.k_h == 3 && self.k_w == 3 && self.stride == 1 && s.worthwhile()).then_some(s)
    }

    /// Input coordinate read by output coordinate `o` at kernel offset `k`, if it is not in the zero padding.
    fn source(&self, o: usize, k: usize, size: usize) -> Option<usize> {
        let i = (o * self.stride + k).checked_sub(self.padding)?;
        (i < size).then_some(i)
    }

    /// Chunks of output rows, `(sample, first row, rows)`: small enough patch matrices, and at least two per
    /// thread when the image allows it so that all threads have work.
    fn chunks(&self, threads: usize) -> Vec<(usize, usize, usize)> {
        let oh = self.out_h();
        let row_elements = self.patch_len() * self.out_w();
        let by_memory = (CHUNK_ELEMENTS / row_elements.max(1)).max(1);
        let by_threads = (oh * self.batch).div_ceil(2 * threads).max(1);
        let rows = by_memory.min(by_threads).min(oh);
        (0..self.batch)
            .flat_map(|n| (0..oh).step_by(rows).map(move |r| (n, r, rows.min(oh - r))))
            .collect()
    }

    /// The output columns `[lo, hi)` whose input column at kernel offset `kx` lies inside the image; the others
    /// read the zero padding.
    fn valid_columns(&self, kx: usize) -> (usize, usize) {
        let lo = self.padding.saturating_sub(kx).div_ceil(self.stride);
        let hi = (self.w + self.padding)
            .saturating_sub(kx)
            .div_ceil(self.stride)
            .min(self.out_w());
        (lo.min(hi), hi)
    }

    /// The patch matrix of output rows `[row0, row0 + rows)` of one sample (`x` its input planes) into `cols`,
    /// `patch_len x (rows * out_w)`. Every element is written (padding as zeros), so `cols` is reused unzeroed;
    /// at stride 1 each patch row's interior is one slice copy.
    fn im2col(&self, x: &[f32], row0: usize, rows: usize, cols: &mut Vec<f32>) {
        let (ow, p) = (self.out_w(), rows * self.out_w());
        let len = self.patch_len() * p;
        cols.resize(len, 0.0);
        for (k, row) in cols[..len].chunks_exact_mut(p).enumerate() {
            let (c, ky, kx) = (
                k / (self.k_h * self.k_w),
                (k / self.k_w) % self.k_h,
                k % self.k_w,
            );
            let plane = &x[c * self.h * self.w..][..self.h * self.w];
            let (lo, hi) = self.valid_columns(kx);
            for (r, out) in row.chunks_exact_mut(ow).enumerate() {
                let Some(iy) = self.source(row0 + r, ky, self.h) else {
                    out.fill(0.0);
                    continue;
                };
                let line = &plane[iy * self.w..][..self.w];
                out[..lo].fill(0.0);
                out[hi..].fill(0.0);
                // Input column of output column `lo` (in range whenever lo < hi).
                let first = (lo * self.stride + kx).wrapping_sub(self.padding);
                if self.stride == 1 {
                    out[lo..hi].copy_from_slice(&line[first.min(self.w)..][..hi - lo]);
                } else {
                    for (o, &v) in out[lo..hi]
                        .iter_mut()
                        .zip(line[first.min(self.w)..].iter().step_by(self.stride))
                    {
                        *o = v;
                    }
                }
            }
        }
    }

    /// The adjoint of [`Self::im2col`]: adds each patch entry of `cols` back onto the input value it came from, in
    /// `grad_x` (one sample's input planes). Parallel over channels, whose planes are disjoint.
    fn col2im_add(&self, cols: &[f32], row0: usize, rows: usize, grad_x: &mut [f32]) {
        let (ow, p) = (self.out_w(), rows * self.out_w());
        let taps = self.k_h * self.k_w;
        grad_x
            .par_chunks_mut(self.h * self.w)
            .enumerate()
            .for_each(|(c, plane)| {
                for tap in 0..taps {
                    let (ky, kx) = (tap / self.k_w, tap % self.k_w);
                    let row = &cols[(c * taps + tap) * p..][..p];
                    for (r, src) in row.chunks_exact(ow).enumerate() {
                        let Some(iy) = self.source(row0 + r, ky, self.h) else {
                            continue;
                        };
                        let line = &mut plane[iy * self.w..][..self.w];
                        for (ox, v) in src.iter().enumerate() {
                            if let Some(ix) = self.source(ox, kx, self.w) {
                                line[ix] += v;
                            }
                        }
                    }
                }
            });
    }
}

/// The forward convolution of contiguous input planes `x` with the kernel matrix `k` (`c_out x patch_len`), plus
/// one `bias` per output channel when given.
fn forward(g: &Geometry, x: &[f32], k: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    if let Some(s) = g.winograd() {
        return winograd::forward(&s, x, k, bias);
    }
    let (pos, pl, sample) = (g.positions(), g.patch_len(), g.c_in * g.h * g.w);
    let mut out = vec![0f32; g.batch * g.c_out * pos];
    let threads = rayon::current_num_threads();
    if g.pointwise() {
        for (n, out) in out.chunks_exact_mut(g.c_out * pos).enumerate() {
            if let Some(bias) = bias {
                for (plane, &b) in out.chunks_exact_mut(pos).zip(bias) {
                    plane.fill(b);
                }
            }
            let x = &x[n * sample..][..sample];
            matmul(
                out,
                (g.c_out, pos, pl),
                k,
                (pl, 1),
                x,
                (pos, 1),
                bias.is_some(),
                Threads::All,
            );
        }
        return out;
    }
    let chunks = g.chunks(threads);
    let results: Vec<Vec<f32>> = chunks
        .par_iter()
        .map_init(Vec::new, |cols, &(n, row0, rows)| {
            let p = rows * g.out_w();
            g.im2col(&x[n * sample..][..sample], row0, rows, cols);
            let mut block = vec![0f32; g.c_out * p];
            matmul(
                &mut block,
                (g.c_out, p, pl),
                k,
                (pl, 1),
                cols,
                (p, 1),
                false,
                Threads::One,
            );
            block
        })
        .collect();
    for (&(n, row0, rows), block) in chunks.iter().zip(&results) {
        let p = rows * g.out_w();
        for (c, src) in block.chunks_exact(p).enumerate() {
            let dst = &mut out[(n * g.c_out + c) * pos + row0 * g.out_w()..][..p];
            match bias {
                Some(bias) => dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v + bias[c]),
                None => dst.copy_from_slice(src),
            }
        }
    }
    out
}

/// At stride 1 with a square kernel the input gradient is itself a convolution: of the output gradient with the
/// kernel flipped in space and its channel axes swapped, padded by `k - 1 - padding`. That runs on the forward's
/// cache-sized chunks, where the general route below multiplies into a patch matrix and then scatters it back
/// element by element (twice PyTorch's time on the UNet's 3x3 layers). `None` where it does not apply.
fn input_grad_as_convolution(g: &Geometry, grad_out: &[f32], k: &[f32]) -> Option<Vec<f32>> {
    if g.stride != 1 || g.k_h != g.k_w || g.padding >= g.k_h || g.pointwise() {
        return None;
    }
    let adjoint = Geometry::new(
        &Shape::from((g.batch, g.c_out, g.out_h(), g.out_w())),
        &Shape::from((g.c_in, g.c_out, g.k_h, g.k_w)),
        1,
        g.k_h - 1 - g.padding,
    )
    .ok()?;
    if adjoint.out_h() != g.h || adjoint.out_w() != g.w {
        return None;
    }
    let taps = g.k_h * g.k_w;
    let mut flipped = vec![0f32; g.c_in * g.c_out * taps];
    flipped
        .par_chunks_mut(g.c_out * taps)
        .enumerate()
        .for_each(|(ci, row)| {
            for (co, dst) in row.chunks_exact_mut(taps).enumerate() {
                let src = &k[(co * g.c_in + ci) * taps..][..taps];
                dst.iter_mut()
                    .zip(src.iter().rev())
                    .for_each(|(d, &v)| *d = v);
            }
        });
    Some(forward(&adjoint, grad_out, &flipped, None))
}

/// The input gradient: the kernel's transpose times the output gradient, scattered back through the patches.
fn input_grad(g: &Geometry, grad_out: &[f32], k: &[f32]) -> Vec<f32> {
    if let Some(grad_x) = input_grad_as_convolution(g, grad_out, k) {
        return grad_x;
    }
    let (pos, pl, sample) = (g.positions(), g.patch_len(), g.c_in * g.h * g.w);
    let mut grad_x = vec![0f32; g.batch * sample];
    let mut cols = Vec::new();
    // Every sample is cut the same way.
    let chunks: Vec<(usize, usize)> = g
        .chunks(1)
        .into_iter()
        .filter(|c| c.0 == 0)
        .map(|c| (c.1, c.2))
        .collect();
    for (n, gx) in grad_x.chunks_exact_mut(sample).enumerate() {
        let go = &grad_out[n * g.c_out * pos..][..g.c_out * pos];
        if g.pointwise() {
            matmul(
                gx,
                (pl, pos, g.c_out),
                k,
                (1, pl),
                go,
                (pos, 1),
                false,
                Threads::All,
            );
            continue;
        }
        for &(row0, rows) in &chunks {
            let p = rows * g.out_w();
            cols.clear();
            cols.resize(pl * p, 0.0);
            let go_chunk = &go[row0 * g.out_w()..];
            matmul(
                &mut cols,
                (pl, p, g.c_out),
                k,
                (1, pl),
                go_chunk,
                (pos, 1),
                false,
                Threads::All,
            );
            g.col2im_add(&cols, row0, rows, gx);
        }
    }
    grad_x
}

/// The kernel gradient: the output gradient times the patch matrices' transpose, summed over chunks.
fn kernel_grad(g: &Geometry, grad_out: &[f32], x: &[f32]) -> Vec<f32> {
    let (pos, pl, sample) = (g.positions(), g.patch_len(), g.c_in * g.h * g.w);
    let mut grad_k = vec![0f32; g.c_out * pl];
    let mut cols = Vec::new();
    // Every sample is cut the same way.
    let chunks: Vec<(usize, usize)> = g
        .chunks(1)
        .into_iter()
        .filter(|c| c.0 == 0)
        .map(|c| (c.1, c.2))
        .collect();
    for n in 0..g.batch {
        let go = &grad_out[n * g.c_out * pos..][..g.c_out * pos];
        let xs = &x[n * sample..][..sample];
        if g.pointwise() {
            matmul(
                &mut grad_k,
                (g.c_out, pl, pos),
                go,
                (pos, 1),
                xs,
                (1, pos),
                n > 0,
                Threads::All,
            );
            continue;
        }
        for (i, &(row0, rows)) in chunks.iter().enumerate() {
            let p = rows * g.out_w();
            g.im2col(xs, row0, rows, &mut cols);
            let go_chunk = &go[row0 * g.out_w()..];
            let accumulate = n > 0 || i > 0;
            matmul(
                &mut grad_k,
                (g.c_out, pl, p),
                go_chunk,
                (pos, 1),
                &cols,
                (1, p),
                accumulate,
                Threads::All,
            );
        }
    }
    grad_k
}

struct Conv2d {
    stride: usize,
    padding: usize,
    /// An untracked bias, added as the output is written (no second pass, no unbiased tensor kept for backward).
    frozen_bias: Option<Tensor>,
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d-chunked"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        kernel: &CpuStorage,
        kernel_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(
            xs_layout.shape(),
            kernel_layout.shape(),
            self.stride,
            self.padding,
        )?;
        let x = contiguous_f32(xs, xs_layout, "conv2d operand")?;
        let k = contiguous_f32(kernel, kernel_layout, "conv2d operand")?;
        let out = match &self.frozen_bias {
            Some(bias) => with_f32(bias, |b| {
                if b.len() != g.c_out {
                    candle_core::bail!(
                        "conv2d: {} biases for {} output channels",
                        b.len(),
                        g.c_out
                    );
                }
                Ok(forward(&g, x, k, Some(b)))
            })??,
            None => forward(&g, x, k, None),
        };
        Ok((
            CpuStorage::F32(out),
            Shape::from((g.batch, g.c_out, g.out_h(), g.out_w())),
        ))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        kernel: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = Geometry::new(xs.shape(), kernel.shape(), self.stride, self.padding)?;
        let grad_xs = if xs.track_op() {
            let grad_x = with_f32(grad, |go| with_f32(kernel, |k| input_grad(&g, go, k)))??;
            Some(Tensor::from_vec(grad_x, xs.shape(), xs.device())?)
        } else {
            None
        };
        // Inversion tracks the latent and the mapping networks, not the UNet's weights: no kernel gradient then.
        let grad_kernel = if kernel.track_op() {
            let grad_k = with_f32(grad, |go| with_f32(xs, |x| kernel_grad(&g, go, x)))??;
            Some(Tensor::from_vec(grad_k, kernel.shape(), kernel.device())?)
        } else {
            None
        };
        Ok((grad_xs, grad_kernel))
    }
}

/// Whether [`conv2d`] takes this convolution (the shapes fit each other).
pub fn conv2d_applies(xs: &Tensor, kernel: &Tensor, padding: usize, stride: usize) -> bool {
    Geometry::new(xs.shape(), kernel.shape(), stride, padding).is_ok()
}

/// 2-D convolution, groups 1 and dilation 1 (f32 on the CPU), differentiable in input and kernel, plus an
/// untracked per-channel `frozen_bias` (a trained bias is added separately, so that it gets its gradient).
pub fn conv2d(
    xs: &Tensor,
    kernel: &Tensor,
    frozen_bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    if frozen_bias.is_some_and(|b| b.track_op()) {
        candle_core::bail!("conv2d: a trained bias cannot be folded into the convolution");
    }
    xs.contiguous()?.apply_op2(
        &kernel.contiguous()?,
        Conv2d {
            stride,
            padding,
            frozen_bias: frozen_bias.cloned(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(
        x: (usize, usize, usize, usize),
        k: (usize, usize, usize, usize),
        stride: usize,
    ) -> Geometry {
        Geometry::new(&Shape::from(x), &Shape::from(k), stride, 1).unwrap()
    }

    #[test]
    fn winograd_takes_the_large_3x3_layers_only() {
        // UNet and VAE layers with many output tiles.
        assert!(
            geometry((1, 320, 64, 64), (320, 320, 3, 3), 1)
                .winograd()
                .is_some()
        );
        assert!(
            geometry((1, 640, 32, 32), (640, 640, 3, 3), 1)
                .winograd()
                .is_some()
        );
        assert!(
            geometry((1, 128, 512, 512), (128, 128, 3, 3), 1)
                .winograd()
                .is_some()
        );
        assert!(
            geometry((1, 16, 32, 32), (16, 16, 3, 3), 1)
                .winograd()
                .is_some()
        );
        // Too few tiles for the kernel transform to pay, too few channels, strided or not 3x3.
        assert!(
            geometry((1, 1280, 16, 16), (1280, 1280, 3, 3), 1)
                .winograd()
                .is_none()
        );
        assert!(
            geometry((1, 16, 28, 28), (16, 16, 3, 3), 1)
                .winograd()
                .is_none()
        );
        assert!(
            geometry((1, 8, 64, 64), (320, 8, 3, 3), 1)
                .winograd()
                .is_none()
        );
        assert!(
            geometry((1, 320, 64, 64), (320, 320, 3, 3), 2)
                .winograd()
                .is_none()
        );
        assert!(
            geometry((1, 320, 64, 64), (320, 320, 1, 1), 1)
                .winograd()
                .is_none()
        );
    }
}
