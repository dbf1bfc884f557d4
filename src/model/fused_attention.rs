//! Scaled dot-product attention on the CPU without materialising the probabilities.
//!
//! A 512x512 image has 4096 latent positions: the UNet's first self-attention layers would build 4096 x 4096
//! scores per head (64 MB each, half a gigabyte per layer at batch 1), write them, read them back for the softmax
//! and again for the product with the values. Here each task takes a tile of query rows of one head, computes its
//! scores (a megabyte, in cache), the softmax and the product with the values, and keeps only the output and each
//! row's log-sum-exp. The backward pass recomputes a tile's probabilities from the log-sum-exp (as
//! FlashAttention does), so a forward+backward keeps no probabilities alive between the passes either.
//!
//! Only for attention whose probabilities nobody needs to see: the attention hook keeps the exact path.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::model::fused::{contiguous_f32, with_f32};
use crate::model::simd;

/// Query rows per task: the tile's scores against 4096 keys are 1 MB.
const TILE: usize = 64;

/// Rows of a block when a product is split across threads: a multiple of gemm's 16-row micro-kernel.
const ROW_ALIGN: usize = 16;

/// Multiply-adds below which a product runs on one thread (tens of microseconds: handing blocks to other threads
/// would cost more than it saves, as on the bundled toy model).
const MIN_SPLIT_WORK: usize = 1 << 20;

/// Threads one matrix product may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    /// This thread only (the caller already runs tasks in parallel).
    One,
    /// Rayon's pool.
    All,
}

/// `dst (m x n) = [dst +] a (m x k) * b (k x n)`, each operand given by its row and column strides; `dst` is
/// contiguous, row-major.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    accumulate: bool,
    threads_choice: Threads,
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs
    };
    // Bounds, so the unsafe call below only touches the slices it was given.
    assert!(m * n <= dst.len() && (m == 0 || n == 0 || last(m, n, n, 1) < dst.len()));
    assert!(m == 0 || k == 0 || last(m, k, a_rs, a_cs) < a.len());
    assert!(k == 0 || n == 0 || last(k, n, b_rs, b_cs) < b.len());
    if m == 0 || n == 0 {
        return;
    }
    // gemm's own parallel split scaled poorly here (2 threads: 1.1x one thread's rate on the UNet's products, where
    // independent products on disjoint row blocks reach 1.9x): split the rows and run the blocks as tasks.
    let threads = rayon::current_num_threads();
    if threads > 1 && threads_choice == Threads::All {
        let rows = m.div_ceil(threads).next_multiple_of(ROW_ALIGN);
        if m >= 2 * ROW_ALIGN && rows < m && m * n * k >= MIN_SPLIT_WORK {
            dst[..m * n]
                .par_chunks_mut(rows * n)
                .enumerate()
                .for_each(|(i, dst)| {
                    let r0 = i * rows;
                    matmul(
                        dst,
                        (dst.len() / n, n, k),
                        &a[r0 * a_rs..],
                        (a_rs, a_cs),
                        b,
                        (b_rs, b_cs),
                        accumulate,
                        Threads::One,
                    )
                });
            return;
        }
    }
    // SAFETY: every index gemm reads or writes is within the asserted bounds of the slices; dst does not alias
    // a or b (a &mut and two & borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            match threads_choice {
                Threads::One => gemm::Parallelism::None,
                Threads::All => gemm::Parallelism::Rayon(rayon::current_num_threads()),
            },
        )
    }
}

/// The sizes of one call: `heads` independent problems (batch times heads) of `queries` x `keys`, head width
/// `dim` for queries and keys and `value_dim` for values.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    heads: usize,
    queries: usize,
    keys: usize,
    dim: usize,
    value_dim: usize,
}

impl Geometry {
    fn new(q: &Shape, k: &Shape, v: &Shape) -> Result<Self> {
        let (q, k, v) = (q.dims(), k.dims(), v.dims());
        let ok = q.len() >= 2
            && q.len() == k.len()
            && k.len() == v.len()
            && q[..q.len() - 2] == k[..k.len() - 2]
            && k[..k.len() - 1] == v[..v.len() - 1]
            && q[q.len() - 1] == k[k.len() - 1];
        if !ok {
            candle_core::bail!("fused attention: incompatible shapes q {q:?}, k {k:?}, v {v:?}");
        }
        let r = q.len();
        Ok(Self {
            heads: q[..r - 2].iter().product(),
            queries: q[r - 2],
            keys: k[r - 2],
            dim: q[r - 1],
            value_dim: v[r - 1],
        })
    }

    fn tiles(&self) -> usize {
        self.queries.div_ceil(TILE)
    }
}

/// The forward op; remembers the log-sum-exp of every row for its backward pass.
struct Attention {
    scale: f32,
    /// `Some(h)`: operands are `(batch, tokens, h * head_dim)` with the heads interleaved in the last axis, as the
    /// projections produce them; gathered per head inside the op, so that no split or merge of heads becomes a
    /// tensor of its own (kept for the backward pass and differentiated as copies).
    interleaved_heads: Option<usize>,
    lse: Mutex<Option<Vec<f32>>>,
}

/// Operand dims as the per-head kernels see them: `(batch, tokens, heads * dim)` -> `(batch * heads, tokens, dim)`.
fn head_major_dims(dims: &[usize], heads: usize) -> Result<Vec<usize>> {
    match *dims {
        [b, n, inner] if heads > 0 && inner.is_multiple_of(heads) => {
            Ok(vec![b * heads, n, inner / heads])
        }
        _ => candle_core::bail!(
            "fused attention: operand {dims:?} is not (batch, tokens, {heads} heads x dim)"
        ),
    }
}

/// `(batch, tokens, heads, dim)` -> `(batch, heads, tokens, dim)`, or back with `inverse`; parallel over the
/// destination's rows (one per head, or one per token).
fn regroup(x: &[f32], batch: usize, tokens: usize, heads: usize, inverse: bool) -> Vec<f32> {
    let dim = x.len() / (batch * tokens * heads).max(1);
    let mut out = vec![0f32; x.len()];
    if dim == 0 {
        return out;
    }
    if inverse {
        out.par_chunks_mut(heads * dim)
            .enumerate()
            .for_each(|(row, dst)| {
                let (b, t) = (row / tokens, row % tokens);
                for (h, d) in dst.chunks_exact_mut(dim).enumerate() {
                    d.copy_from_slice(&x[((b * heads + h) * tokens + t) * dim..][..dim]);
                }
            });
    } else {
        out.par_chunks_mut(tokens * dim)
            .enumerate()
            .for_each(|(row, dst)| {
                let (b, h) = (row / heads, row % heads);
                for (t, d) in dst.chunks_exact_mut(dim).enumerate() {
                    d.copy_from_slice(&x[((b * tokens + t) * heads + h) * dim..][..dim]);
                }
            });
    }
    out
}

impl Attention {
    fn geometry(&self, q: &[usize], k: &[usize], v: &[usize]) -> Result<Geometry> {
        match self.interleaved_heads {
            Some(h) => Geometry::new(
                &Shape::from(head_major_dims(q, h)?),
                &Shape::from(head_major_dims(k, h)?),
                &Shape::from(head_major_dims(v, h)?),
            ),
            None => Geometry::new(&Shape::from(q), &Shape::from(k), &Shape::from(v)),
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(q_layout.dims(), k_layout.dims(), v_layout.dims())?;
        let (q, k, v) = (
            contiguous_f32(q, q_layout, "fused attention operand")?,
            contiguous_f32(k, k_layout, "fused attention operand")?,
            contiguous_f32(v, v_layout, "fused attention operand")?,
        );
        let (n, m, d, dv) = (g.queries, g.keys, g.dim, g.value_dim);
        let gathered;
        let (q, k, v) = match self.interleaved_heads {
            Some(h) => {
                let b = g.heads / h;
                gathered = (
                    regroup(q, b, n, h, false),
                    regroup(k, b, m, h, false),
                    regroup(v, b, m, h, false),
                );
                (&gathered.0[..], &gathered.1[..], &gathered.2[..])
            }
            None => (q, k, v),
        };
        let mut out = vec![0f32; g.heads * n * dv];
        let mut lse = vec![0f32; g.heads * n];
        // Heads first, then tiles within a head, so that a tile's rows all belong to one head.
        let tiles = g.tiles();
        let mut out_tiles: Vec<(&mut [f32], &mut [f32])> = Vec::with_capacity(g.heads * tiles);
        for (head_out, head_lse) in out.chunks_mut(n * dv).zip(lse.chunks_mut(n)) {
            out_tiles.extend(
                head_out
                    .chunks_mut(TILE * dv)
                    .zip(head_lse.chunks_mut(TILE)),
            );
        }
        out_tiles.into_par_iter().enumerate().for_each_init(
            Vec::new,
            |scores: &mut Vec<f32>, (task, (out, lse))| {
                let (head, tile) = (task / tiles, task % tiles);
                let rows = lse.len();
                let q = &q[(head * n + tile * TILE) * d..][..rows * d];
                let (k, v) = (&k[head * m * d..][..m * d], &v[head * m * dv..][..m * dv]);
                scores.resize(rows * m, 0.0);
                matmul(
                    scores,
                    (rows, m, d),
                    q,
                    (d, 1),
                    k,
                    (1, d),
                    false,
                    Threads::One,
                );
                for (row, l) in scores.chunks_exact_mut(m).zip(lse.iter_mut()) {
                    *l = simd::softmax_row(row, self.scale);
                }
                matmul(
                    out,
                    (rows, dv, m),
                    scores,
                    (m, 1),
                    v,
                    (dv, 1),
                    false,
                    Threads::One,
                );
            },
        );
        *self.lse.lock().expect("lse lock") = Some(lse);
        let mut shape = q_layout.dims().to_vec();
        let out = match self.interleaved_heads {
            Some(h) => {
                *shape.last_mut().expect("rank checked") = dv * h;
                regroup(&out, g.heads / h, n, h, true)
            }
            None => {
                *shape.last_mut().expect("rank checked") = dv;
                out
            }
        };
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().expect("lse lock").clone().ok_or_else(|| {
            candle_core::Error::Msg("fused attention: backward before forward".into())
        })?;
        let g = self.geometry(q.dims(), k.dims(), v.dims())?;
        let (n, m, d, dv) = (g.queries, g.keys, g.dim, g.value_dim);
        // Head-major copies of the operands.
        let read = |t: &Tensor, tokens: usize| -> Result<Vec<f32>> {
            with_f32(t, |flat| match self.interleaved_heads {
                Some(h) => regroup(flat, g.heads / h, tokens, h, false),
                None => flat.to_vec(),
            })
        };
        let (qd, kd, vd) = (read(q, n)?, read(k, m)?, read(v, m)?);
        let (od, god) = (read(out, n)?, read(grad_out, n)?);
        let mut dq = vec![0f32; qd.len()];
        let mut dk = vec![0f32; kd.len()];
        let mut dvv = vec![0f32; vd.len()];
        dq.par_chunks_mut(n * d)
            .zip(dk.par_chunks_mut(m * d))
            .zip(dvv.par_chunks_mut(m * dv))
            .enumerate()
            .for_each(|(head, ((dq, dk), dvh))| {
                let q = &qd[head * n * d..][..n * d];
                let k = &kd[head * m * d..][..m * d];
                let v = &vd[head * m * dv..][..m * dv];
                let o = &od[head * n * dv..][..n * dv];
                let go = &god[head * n * dv..][..n * dv];
                let lse = &lse[head * n..][..n];
                let mut p = vec![0f32; TILE * m];
                let mut dp = vec![0f32; TILE * m];
                for tile in 0..g.tiles() {
                    let r0 = tile * TILE;
                    let rows = TILE.min(n - r0);
                    let (p, dp) = (&mut p[..rows * m], &mut dp[..rows * m]);
                    let q_t = &q[r0 * d..][..rows * d];
                    let go_t = &go[r0 * dv..][..rows * dv];
                    let o_t = &o[r0 * dv..][..rows * dv];
                    // P = exp(scale * q k^T - lse)
                    matmul(p, (rows, m, d), q_t, (d, 1), k, (1, d), false, Threads::One);
                    for (row, &l) in p.chunks_exact_mut(m).zip(&lse[r0..r0 + rows]) {
                        simd::exp_affine(row, self.scale, l);
                    }
                    // dV += P^T dO
                    matmul(
                        dvh,
                        (m, dv, rows),
                        p,
                        (1, m),
                        go_t,
                        (dv, 1),
                        true,
                        Threads::One,
                    );
                    // dP = dO V^T; dS = P (dP - rowsum(dO * O)), times the scale for the products below.
                    matmul(
                        dp,
                        (rows, m, dv),
                        go_t,
                        (dv, 1),
                        v,
                        (1, dv),
                        false,
                        Threads::One,
                    );
                    for ((dp_row, p_row), (go_row, o_row)) in dp
                        .chunks_exact_mut(m)
                        .zip(p.chunks_exact(m))
                        .zip(go_t.chunks_exact(dv).zip(o_t.chunks_exact(dv)))
                    {
                        let delta: f32 = go_row.iter().zip(o_row).map(|(a, b)| a * b).sum();
                        for (ds, &pv) in dp_row.iter_mut().zip(p_row) {
                            *ds = pv * (*ds - delta) * self.scale;
                        }
                    }
                    // dQ = dS K; dK += dS^T Q
                    matmul(
                        &mut dq[r0 * d..][..rows * d],
                        (rows, d, m),
                        dp,
                        (m, 1),
                        k,
                        (d, 1),
                        false,
                        Threads::One,
                    );
                    matmul(
                        dk,
                        (m, d, rows),
                        dp,
                        (1, m),
                        q_t,
                        (d, 1),
                        true,
                        Threads::One,
                    );
                }
            });
        let dev = q.device();
        let back = |grad: Vec<f32>, tokens: usize, like: &Tensor| -> Result<Option<Tensor>> {
            let grad = match self.interleaved_heads {
                Some(h) => regroup(&grad, g.heads / h, tokens, h, true),
                None => grad,
            };
            Ok(Some(Tensor::from_vec(grad, like.shape(), dev)?))
        };
        Ok((back(dq, n, q)?, back(dk, m, k)?, back(dvv, m, v)?))
    }
}

/// `softmax(scale * q k^T) v` over the last two axes of contiguous f32 CPU tensors `(..., queries, dim)`,
/// `(..., keys, dim)`, `(..., keys, value_dim)`; differentiable in all three.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention {
            scale: scale as f32,
            interleaved_heads: None,
            lse: Mutex::new(None),
        },
    )
}

/// [`attention`] for `heads` heads interleaved in the last axis: `(batch, tokens, heads * dim)` operands and
/// output, as the projections produce and consume them; differentiable in all three.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention {
            scale: scale as f32,
            interleaved_heads: Some(heads),
            lse: Mutex::new(None),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The row-split product against a plain triple loop: uneven blocks (3 threads), a transposed and a strided
    /// operand, accumulation into `dst`, and too few rows to split.
    #[test]
    fn products_split_by_rows_match_the_definition() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for (m, n, k) in [(4100, 17, 19), (37, 5, 3), (20, 4, 6)] {
            let a: Vec<f32> = (0..m * k * 2)
                .map(|i| ((i * 37) % 23) as f32 / 23.0 - 0.5)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 11) % 17) as f32 / 17.0 - 0.5)
                .collect();
            let start: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32).collect();
            // a read with row stride 1 and column stride 2m (a transposed, strided matrix); b row-major.
            let a_at = |r: usize, c: usize| a[r + c * 2 * m];
            for accumulate in [false, true] {
                let mut dst = start.clone();
                pool.install(|| {
                    matmul(
                        &mut dst,
                        (m, n, k),
                        &a,
                        (1, 2 * m),
                        &b,
                        (n, 1),
                        accumulate,
                        Threads::All,
                    )
                });
                for r in 0..m {
                    for c in 0..n {
                        let dot: f32 = (0..k).map(|i| a_at(r, i) * b[i * n + c]).sum();
                        let want = dot + if accumulate { start[r * n + c] } else { 0.0 };
                        let got = dst[r * n + c];
                        assert!(
                            (got - want).abs() < 1e-5,
                            "{m}x{n}x{k} ({r}, {c}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    fn random(shape: &[usize], seed: u64) -> Result<Var> {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| (rng.next_u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
            .collect();
        Var::from_vec(data, shape, &Device::Cpu)
    }

    fn relative_error(a: &Tensor, reference: &Tensor) -> Result<f32> {
        let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-12);
        Ok((a - reference)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
    }

    /// Output and all three gradients against candle's composed attention, on sizes that leave a partial tile and
    /// with different key and value widths.
    #[test]
    fn fused_attention_matches_the_composed_ops_and_their_gradients() -> Result<()> {
        for (heads, n, m, d, dv) in [(3, 150, 77, 8, 8), (2, 64, 130, 16, 5), (1, 1, 1, 4, 4)] {
            let q = random(&[heads, n, d], 1)?;
            let k = random(&[heads, m, d], 2)?;
            let v = random(&[heads, m, dv], 3)?;
            let weights = random(&[heads, n, dv], 4)?.as_tensor().detach();
            let scale = (d as f64).powf(-0.5) * 3.0;
            let composed = crate::model::nn::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?
                .matmul(v.as_tensor())?;
            let fused = attention(&q, &k, &v, scale)?;
            assert!(relative_error(&fused, &composed)? < 1e-5, "output");
            let grads_c = (composed * &weights)?.sum_all()?.backward()?;
            let grads_f = (fused * &weights)?.sum_all()?.backward()?;
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let gf = grads_f
                    .get(var)
                    .unwrap_or_else(|| panic!("fused: no grad {name}"));
                let gc = grads_c
                    .get(var)
                    .unwrap_or_else(|| panic!("composed: no grad {name}"));
                let err = relative_error(gf, gc)?;
                assert!(
                    err < 1e-4,
                    "grad {name} for {heads}x{n}x{m}x{d}x{dv}: {err}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn interleaved_heads_match_split_heads_and_their_gradients() -> Result<()> {
        // (batch, heads, queries, keys, dim, value dim)
        for (b, h, n, m, d, dv) in [(2, 3, 70, 77, 8, 8), (1, 2, 65, 65, 5, 4)] {
            let q = random(&[b, n, h * d], 5)?;
            let k = random(&[b, m, h * d], 6)?;
            let v = random(&[b, m, h * dv], 7)?;
            let weights = random(&[b, n, h * dv], 8)?.as_tensor().detach();
            let scale = (d as f64).powf(-0.5) * 2.0;
            let split = |x: &Tensor, w: usize| -> Result<Tensor> {
                let (b, t, _) = x.dims3()?;
                x.reshape((b, t, h, w))?.transpose(1, 2)?.contiguous()
            };
            let per_head = attention(&split(&q, d)?, &split(&k, d)?, &split(&v, dv)?, scale)?
                .transpose(1, 2)?
                .reshape((b, n, h * dv))?;
            let fused = multi_head_attention(&q, &k, &v, h, scale)?;
            assert_eq!(fused.dims(), per_head.dims());
            assert!(relative_error(&fused, &per_head)? < 1e-6, "output");
            let grads_s = (per_head * &weights)?.sum_all()?.backward()?;
            let grads_f = (fused * &weights)?.sum_all()?.backward()?;
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let err = relative_error(grads_f.get(var).unwrap(), grads_s.get(var).unwrap())?;
                assert!(err < 1e-5, "grad {name}, batch {b}, heads {h}: {err}");
            }
        }
        let q = Tensor::zeros((2, 4, 9), candle_core::DType::F32, &Device::Cpu)?;
        let err = multi_head_attention(&q, &q, &q, 2, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 heads"), "{err}");
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_an_error() -> Result<()> {
        let q = Tensor::zeros((2, 4, 8), candle_core::DType::F32, &Device::Cpu)?;
        let k = Tensor::zeros((2, 5, 7), candle_core::DType::F32, &Device::Cpu)?;
        let err = attention(&q, &k, &k, 1.0).unwrap_err().to_string();
        assert!(err.contains("incompatible shapes"), "{err}");
        Ok(())
    }
}
