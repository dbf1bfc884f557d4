//! Vectorised element-wise kernels for the fused CPU ops: the exponential of softmax and attention, SiLU and the
//! exact GELU. The standard library's `exp` and candle's `erf` are scalar calls (libm), which left the 4096-key
//! softmax of the UNet's first attention layers at about a fifth of a UNet forward. Here the same branch-free
//! arithmetic runs 8 lanes at a time with AVX2 + FMA intrinsics on CPUs that have them (checked at run time), and
//! one lane at a time elsewhere; the compiler's auto-vectoriser turned the scalar form back into branches.
//!
//! Accuracy: `exp` follows Cephes' `expf` (range reduction by ln 2 in two parts, degree-6 polynomial), within 3e-7
//! relative for arguments above -87.3 (below that it returns 0, where the true value is under 1.2e-38); `erf` is
//! the rational approximation XLA and Eigen use for f32, within 1e-6 of the exact value. NaN stays NaN.

/// `a * b + c`, fused (a single rounding) where the code is compiled for FMA, as the vector code always is.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Cephes' `expf` constants.
mod exp_constants {
    /// Below this e^x is under the smallest normal f32: the result is 0.
    pub const LOW: f32 = -87.336_55;
    /// Arguments are clamped here so that 2^n stays finite; above `OVERFLOW` the result is infinite.
    pub const HIGH: f32 = 88.0;
    pub const OVERFLOW: f32 = 88.722_84;
    /// Adding then subtracting 1.5 * 2^23 rounds to the nearest integer; the sum's low bits hold that integer.
    pub const ROUND: f32 = 12_582_912.0;
    /// ln 2 in two parts, so that `x - n ln 2` loses no precision.
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    /// The polynomial for (e^r - 1 - r) / r^2 on [-ln2/2, ln2/2], highest degree first.
    pub const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];
}

/// XLA's f32 erf: `x * ALPHA(x^2) / BETA(x^2)` on [-4, 4], highest degree first.
mod erf_constants {
    pub const ALPHA: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_5e-8,
        -2.101_023_6e-6,
        -5.692_506e-5,
        -7.349_906_5e-4,
        -2.954_600_5e-3,
        -1.609_603e-2,
    ];
    pub const BETA: [f32; 5] = [
        -1.456_607e-5,
        -2.133_740_5e-4,
        -1.682_827_6e-3,
        -7.373_329_4e-3,
        -1.426_474_7e-2,
    ];
}

const INV_SQRT_2PI: f32 = 0.398_942_3;

/// e^x for one lane (see the module's accuracy note).
#[inline(always)]
fn exp<const FMA: bool>(x: f32) -> f32 {
    use exp_constants::*;
    let clamped = x.clamp(LOW, HIGH);
    let shifted = madd::<FMA>(clamped, std::f32::consts::LOG2_E, ROUND);
    let n = shifted - ROUND;
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, clamped));
    let mut p = P[0];
    for &c in &P[1..] {
        p = madd::<FMA>(p, r, c);
    }
    let y = madd::<FMA>(p, r * r, r) + 1.0;
    let exponent = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let two_n = f32::from_bits((exponent.wrapping_add(127) << 23) as u32);
    let y = y * two_n;
    let y = if x < LOW { 0.0 } else { y };
    if x > OVERFLOW { f32::INFINITY } else { y }
}

/// erf(x) for one lane (erf is +-1 to f32 precision beyond [-4, 4]).
#[inline(always)]
fn erf<const FMA: bool>(x: f32) -> f32 {
    use erf_constants::*;
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut num = ALPHA[0];
    for &a in &ALPHA[1..] {
        num = madd::<FMA>(num, x2, a);
    }
    let mut den = BETA[0];
    for &b in &BETA[1..] {
        den = madd::<FMA>(den, x2, b);
    }
    x * num / den
}

/// Exact (erf) GELU and its derivative at `x`.
#[inline(always)]
fn gelu_and_slope<const FMA: bool>(x: f32) -> (f32, f32) {
    let cdf = 0.5 * (1.0 + erf::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = exp::<FMA>(-0.5 * x * x) * INV_SQRT_2PI;
    (x * cdf, madd::<FMA>(x, pdf, cdf))
}

/// Scalar versions: the fallback on CPUs without AVX2 + FMA (or not x86-64), and the tails of the vector loops
/// (`FMA` true there, so that a tail element gets exactly the value a vector lane would).
mod lanes {
    use super::{exp, gelu_and_slope};

    pub fn softmax_row<const FMA: bool>(row: &mut [f32], scale: f32) -> f32 {
        row.iter_mut().for_each(|v| *v *= scale);
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum = exp_shifted_sum::<FMA>(row, max);
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
        max + sum.ln()
    }

    /// `row[i] = exp(row[i] - max)`, returning the sum.
    pub fn exp_shifted_sum<const FMA: bool>(row: &mut [f32], max: f32) -> f32 {
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = exp::<FMA>(*v - max);
            sum += *v;
        }
        sum
    }

    pub fn exp_affine<const FMA: bool>(row: &mut [f32], scale: f32, shift: f32) {
        for v in row.iter_mut() {
            *v = exp::<FMA>(super::madd::<FMA>(*v, scale, -shift));
        }
    }

    pub fn silu<const FMA: bool>(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v / (1.0 + exp::<FMA>(-v));
        }
    }

    pub fn silu_backward<const FMA: bool>(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((d, &v), &g) in dx.iter_mut().zip(x).zip(g) {
            let s = 1.0 / (1.0 + exp::<FMA>(-v));
            *d = g * s * (1.0 + v * (1.0 - s));
        }
    }

    pub fn geglu_row<const FMA: bool>(value: &[f32], gate: &[f32], out: &mut [f32]) {
        for ((o, &v), &g) in out.iter_mut().zip(value).zip(gate) {
            *o = v * gelu_and_slope::<FMA>(g).0;
        }
    }

    pub fn geglu_row_backward<const FMA: bool>(
        value: &[f32],
        gate: &[f32],
        grad: &[f32],
        d_value: &mut [f32],
        d_gate: &mut [f32],
    ) {
        for (((dv, dg), (&v, &g)), &gr) in d_value
            .iter_mut()
            .zip(d_gate.iter_mut())
            .zip(value.iter().zip(gate))
            .zip(grad)
        {
            let (gelu, slope) = gelu_and_slope::<FMA>(g);
            *dv = gr * gelu;
            *dg = gr * v * slope;
        }
    }
}

/// AVX2 + FMA versions, 8 lanes at a time; the same arithmetic as the scalar lane functions, in the same order.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::lanes;

    const LANES: usize = 8;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn splat(v: f32) -> __m256 {
        _mm256_set1_ps(v)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn load(s: &[f32]) -> __m256 {
        assert!(s.len() >= LANES);
        // SAFETY: 8 elements were just checked to be there; loadu has no alignment requirement.
        unsafe { _mm256_loadu_ps(s.as_ptr()) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn store(s: &mut [f32], v: __m256) {
        assert!(s.len() >= LANES);
        // SAFETY: as in `load`.
        unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
    }

    /// Sum of the 8 lanes, in a fixed order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sum_lanes(v: __m256) -> f32 {
        let mut lanes = [0f32; LANES];
        store(&mut lanes, v);
        lanes.iter().sum()
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn max_lanes(v: __m256) -> f32 {
        let mut lanes = [0f32; LANES];
        store(&mut lanes, v);
        lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }

    /// Clamps to [low, high]; a NaN lane stays NaN (max/min return their second operand then).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn clamp(x: __m256, low: f32, high: f32) -> __m256 {
        _mm256_min_ps(splat(high), _mm256_max_ps(splat(low), x))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp(x: __m256) -> __m256 {
        use super::exp_constants::*;
        let clamped = clamp(x, LOW, HIGH);
        let shifted = _mm256_fmadd_ps(clamped, splat(std::f32::consts::LOG2_E), splat(ROUND));
        let n = _mm256_sub_ps(shifted, splat(ROUND));
        let r = _mm256_fnmadd_ps(
            n,
            splat(LN2_LO),
            _mm256_fnmadd_ps(n, splat(LN2_HI), clamped),
        );
        let mut p = splat(P[0]);
        for &c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, splat(c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), splat(1.0));
        let exponent = _mm256_sub_epi32(
            _mm256_castps_si256(shifted),
            _mm256_set1_epi32(ROUND.to_bits() as i32),
        );
        let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            exponent,
            _mm256_set1_epi32(127),
        )));
        let y = _mm256_mul_ps(y, two_n);
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, splat(LOW));
        let y = _mm256_andnot_ps(underflow, y);
        let overflow = _mm256_cmp_ps::<_CMP_GT_OQ>(x, splat(OVERFLOW));
        _mm256_blendv_ps(y, splat(f32::INFINITY), overflow)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn erf(x: __m256) -> __m256 {
        use super::erf_constants::*;
        let x = clamp(x, -4.0, 4.0);
        let x2 = _mm256_mul_ps(x, x);
        let mut num = splat(ALPHA[0]);
        for &a in &ALPHA[1..] {
            num = _mm256_fmadd_ps(num, x2, splat(a));
        }
        let mut den = splat(BETA[0]);
        for &b in &BETA[1..] {
            den = _mm256_fmadd_ps(den, x2, splat(b));
        }
        _mm256_div_ps(_mm256_mul_ps(x, num), den)
    }

    /// GELU and its slope, as `super::gelu_and_slope`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn gelu_and_slope(x: __m256) -> (__m256, __m256) {
        let half = splat(0.5);
        let e = erf(_mm256_mul_ps(x, splat(std::f32::consts::FRAC_1_SQRT_2)));
        let cdf = _mm256_mul_ps(half, _mm256_add_ps(splat(1.0), e));
        let arg = _mm256_mul_ps(_mm256_mul_ps(splat(-0.5), x), x);
        let pdf = _mm256_mul_ps(exp(arg), splat(super::INV_SQRT_2PI));
        (_mm256_mul_ps(x, cdf), _mm256_fmadd_ps(x, pdf, cdf))
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn softmax_row(row: &mut [f32], scale: f32) -> f32 {
        let whole = row.len() / LANES * LANES;
        let (body, tail) = row.split_at_mut(whole);
        let mut max = splat(f32::NEG_INFINITY);
        for chunk in body.chunks_exact_mut(LANES) {
            let v = _mm256_mul_ps(load(chunk), splat(scale));
            store(chunk, v);
            max = _mm256_max_ps(v, max);
        }
        tail.iter_mut().for_each(|v| *v *= scale);
        let max = tail.iter().copied().fold(max_lanes(max), f32::max);
        let mut sum = splat(0.0);
        for chunk in body.chunks_exact_mut(LANES) {
            let e = exp(_mm256_sub_ps(load(chunk), splat(max)));
            store(chunk, e);
            sum = _mm256_add_ps(sum, e);
        }
        let sum = sum_lanes(sum) + lanes::exp_shifted_sum::<true>(tail, max);
        let inv = 1.0 / sum;
        for chunk in body.chunks_exact_mut(LANES) {
            store(chunk, _mm256_mul_ps(load(chunk), splat(inv)));
        }
        tail.iter_mut().for_each(|v| *v *= inv);
        max + sum.ln()
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn exp_affine(row: &mut [f32], scale: f32, shift: f32) {
        let whole = row.len() / LANES * LANES;
        let (body, tail) = row.split_at_mut(whole);
        for chunk in body.chunks_exact_mut(LANES) {
            let arg = _mm256_fmadd_ps(load(chunk), splat(scale), splat(-shift));
            store(chunk, exp(arg));
        }
        lanes::exp_affine::<true>(tail, scale, shift);
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn silu(x: &[f32], out: &mut [f32]) {
        let n = x.len().min(out.len());
        let whole = n / LANES * LANES;
        for (o, x) in out[..whole]
            .chunks_exact_mut(LANES)
            .zip(x[..whole].chunks_exact(LANES))
        {
            let v = load(x);
            let e = exp(_mm256_sub_ps(splat(0.0), v));
            store(o, _mm256_div_ps(v, _mm256_add_ps(splat(1.0), e)));
        }
        lanes::silu::<true>(&x[whole..n], &mut out[whole..n]);
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn silu_backward(x: &[f32], g: &[f32], dx: &mut [f32]) {
        let n = x.len().min(g.len()).min(dx.len());
        let whole = n / LANES * LANES;
        let one = splat(1.0);
        for ((d, x), g) in dx[..whole]
            .chunks_exact_mut(LANES)
            .zip(x[..whole].chunks_exact(LANES))
            .zip(g[..whole].chunks_exact(LANES))
        {
            let v = load(x);
            let s = _mm256_div_ps(one, _mm256_add_ps(one, exp(_mm256_sub_ps(splat(0.0), v))));
            let slope = _mm256_add_ps(one, _mm256_mul_ps(v, _mm256_sub_ps(one, s)));
            store(d, _mm256_mul_ps(_mm256_mul_ps(load(g), s), slope));
        }
        lanes::silu_backward::<true>(&x[whole..n], &g[whole..n], &mut dx[whole..n]);
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn geglu_row(value: &[f32], gate: &[f32], out: &mut [f32]) {
        let n = value.len().min(gate.len()).min(out.len());
        let whole = n / LANES * LANES;
        for ((o, v), g) in out[..whole]
            .chunks_exact_mut(LANES)
            .zip(value[..whole].chunks_exact(LANES))
            .zip(gate[..whole].chunks_exact(LANES))
        {
            store(o, _mm256_mul_ps(load(v), gelu_and_slope(load(g)).0));
        }
        lanes::geglu_row::<true>(&value[whole..n], &gate[whole..n], &mut out[whole..n]);
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn geglu_row_backward(
        value: &[f32],
        gate: &[f32],
        grad: &[f32],
        d_value: &mut [f32],
        d_gate: &mut [f32],
    ) {
        let n = value
            .len()
            .min(gate.len())
            .min(grad.len())
            .min(d_value.len())
            .min(d_gate.len());
        let whole = n / LANES * LANES;
        for i in (0..whole).step_by(LANES) {
            let (gelu, slope) = gelu_and_slope(load(&gate[i..]));
            let gr = load(&grad[i..]);
            store(&mut d_value[i..], _mm256_mul_ps(gr, gelu));
            store(
                &mut d_gate[i..],
                _mm256_mul_ps(_mm256_mul_ps(gr, load(&value[i..])), slope),
            );
        }
        lanes::geglu_row_backward::<true>(
            &value[whole..n],
            &gate[whole..n],
            &grad[whole..n],
            &mut d_value[whole..n],
            &mut d_gate[whole..n],
        );
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    // The standard library caches what it detects: this is two loads after the first call.
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Defines a public kernel that runs the AVX2 version when the CPU has AVX2 and FMA, else the scalar one.
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if avx2_fma() {
                // SAFETY: the CPU was just checked to support AVX2 and FMA.
                return unsafe { avx2::$name($($arg),*) };
            }
            lanes::$name::<false>($($arg),*)
        }
    };
}

dispatch!(
    /// Softmax of `scale * row` in place; returns the row's log-sum-exp (of the scaled values).
    softmax_row(row: &mut [f32], scale: f32) -> f32
);
dispatch!(
    /// `row[i] = exp(scale * row[i] - shift)` in place.
    exp_affine(row: &mut [f32], scale: f32, shift: f32)
);
dispatch!(
    /// `out[i] = x[i] * sigmoid(x[i])`.
    silu(x: &[f32], out: &mut [f32])
);
dispatch!(
    /// The input gradient of SiLU: `dx[i] = g[i] * s (1 + x (1 - s))`, `s = sigmoid(x[i])`.
    silu_backward(x: &[f32], g: &[f32], dx: &mut [f32])
);
dispatch!(
    /// GEGLU of one row split in halves (value, gate): `out[i] = value[i] * gelu(gate[i])`.
    geglu_row(value: &[f32], gate: &[f32], out: &mut [f32])
);
dispatch!(
    /// The gradient of one GEGLU row: `d_value = grad * gelu(gate)`, `d_gate = grad * value * gelu'(gate)`.
    geglu_row_backward(
        value: &[f32],
        gate: &[f32],
        grad: &[f32],
        d_value: &mut [f32],
        d_gate: &mut [f32]
    )
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Arguments spread over the ranges each kernel sees, plus the edges.
    fn samples(low: f32, high: f32) -> Vec<f32> {
        let n = 20_011;
        let mut xs: Vec<f32> = (0..n)
            .map(|i| low + (high - low) * i as f32 / (n - 1) as f32)
            .collect();
        xs.extend([0.0, -0.0, 1e-30, -1e-30, low, high]);
        xs
    }

    fn check_exp<const FMA: bool>() {
        for x in samples(-87.0, 88.0) {
            let (got, want) = (exp::<FMA>(x), (x as f64).exp());
            let rel = ((got as f64 - want) / want).abs();
            assert!(
                rel < 3e-7,
                "exp({x}) = {got}, want {want} (relative error {rel:e})"
            );
        }
        assert_eq!(exp::<FMA>(-100.0), 0.0);
        assert_eq!(exp::<FMA>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp::<FMA>(89.0), f32::INFINITY);
        assert!(exp::<FMA>(f32::NAN).is_nan());
    }

    fn check_erf<const FMA: bool>() {
        for x in samples(-6.0, 6.0) {
            let got = erf::<FMA>(x) as f64;
            let want = libm::erf(x as f64);
            assert!(
                (got - want).abs() < 1e-6,
                "erf({x}) = {got}, want {want} (difference {:e})",
                (got - want).abs()
            );
        }
        assert!(erf::<FMA>(f32::NAN).is_nan());
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_the_exact_value() {
        check_exp::<false>();
        check_exp::<true>();
    }

    #[test]
    fn erf_is_within_1e_6_of_the_exact_value() {
        check_erf::<false>();
        check_erf::<true>();
    }

    #[test]
    fn softmax_row_matches_the_exact_softmax_and_its_log_sum_exp() {
        for len in [1, 7, 8, 9, 77, 4096] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
                .collect();
            let scale = 0.158_113_88;
            let scaled: Vec<f64> = row.iter().map(|&v| (v * scale) as f64).collect();
            let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scaled.iter().map(|v| (v - max).exp()).sum();
            let mut got = row.clone();
            let lse = softmax_row(&mut got, scale);
            assert!(
                (lse as f64 - (max + sum.ln())).abs() < 1e-5,
                "lse {lse} at {len}"
            );
            for (g, v) in got.iter().zip(&scaled) {
                let want = (v - max).exp() / sum;
                assert!(
                    (*g as f64 - want).abs() < 1e-6 * want.max(1e-3),
                    "{g} vs {want}"
                );
            }
        }
    }

    /// The vector code and the scalar code the tails use give the same bits (so a result does not depend on
    /// where an element falls in a row).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_lanes_equal_the_scalar_lanes_bit_for_bit() {
        if !avx2_fma() {
            eprintln!("skipped: this CPU has no AVX2 + FMA");
            return;
        }
        let x = samples(-90.0, 90.0);
        let g: Vec<f32> = x.iter().map(|v| (v * 1.3).cos()).collect();
        let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        // SAFETY (every unsafe call below): the CPU was checked for AVX2 and FMA above.
        unsafe { avx2::silu(&x, &mut a) };
        lanes::silu::<true>(&x, &mut b);
        assert_eq!(bits(&a), bits(&b), "silu");
        unsafe { avx2::silu_backward(&x, &g, &mut a) };
        lanes::silu_backward::<true>(&x, &g, &mut b);
        assert_eq!(bits(&a), bits(&b), "silu backward");
        unsafe { avx2::geglu_row(&g, &x, &mut a) };
        lanes::geglu_row::<true>(&g, &x, &mut b);
        assert_eq!(bits(&a), bits(&b), "geglu");
        let (mut a2, mut b2) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        unsafe { avx2::geglu_row_backward(&g, &x, &g, &mut a, &mut a2) };
        lanes::geglu_row_backward::<true>(&g, &x, &g, &mut b, &mut b2);
        assert_eq!(
            (bits(&a), bits(&a2)),
            (bits(&b), bits(&b2)),
            "geglu backward"
        );
        let (mut a, mut b) = (x.clone(), x.clone());
        unsafe { avx2::exp_affine(&mut a, 0.7, 3.0) };
        lanes::exp_affine::<true>(&mut b, 0.7, 3.0);
        assert_eq!(bits(&a), bits(&b), "exp");
    }

    #[test]
    fn dispatched_kernels_match_their_scalar_definitions() {
        let x = samples(-12.0, 12.0);
        let g: Vec<f32> = x.iter().map(|v| (v * 3.7).sin()).collect();
        let mut out = vec![0f32; x.len()];
        silu(&x, &mut out);
        for (&o, &v) in out.iter().zip(&x) {
            let want = v as f64 / (1.0 + (-(v as f64)).exp());
            assert!(
                (o as f64 - want).abs() < 2e-6 * want.abs().max(1.0),
                "silu({v})"
            );
        }
        silu_backward(&x, &g, &mut out);
        for ((&o, &v), &g) in out.iter().zip(&x).zip(&g) {
            let (v, g) = (v as f64, g as f64);
            let s = 1.0 / (1.0 + (-v).exp());
            let want = g * s * (1.0 + v * (1.0 - s));
            assert!(
                (o as f64 - want).abs() < 2e-6 * want.abs().max(1.0),
                "silu'({v})"
            );
        }
        let (mut dv, mut dg) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        geglu_row(&g, &x, &mut out);
        geglu_row_backward(&g, &x, &g, &mut dv, &mut dg);
        for i in 0..x.len() {
            let (v, gate) = (g[i] as f64, x[i] as f64);
            let cdf = 0.5 * (1.0 + libm::erf(gate / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * gate * gate).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let close = |a: f32, b: f64| (a as f64 - b).abs() < 2e-6 * b.abs().max(1.0);
            assert!(close(out[i], v * gate * cdf), "geglu at {gate}");
            assert!(close(dv[i], v * gate * cdf), "geglu d_value at {gate}");
            assert!(
                close(dg[i], v * v * (cdf + gate * pdf)),
                "geglu d_gate at {gate}"
            );
        }
    }
}
