//! Scalar functions of the fused kernels, written without calls or branches so that the
//! loops over a buffer run in vector registers (the C library's `expf` takes one call per
//! value), and `multiversion!`, which compiles such a loop for the widest vector unit the
//! CPU has.

/// Defines a function whose body is compiled three times, for AVX-512, for AVX2 with FMA
/// and for baseline x86-64 (whose vectors are four lanes wide, what the binary targets),
/// and picks the widest the CPU has at run time. For the loops over buffers of the fused
/// kernels: the compiler vectorises them for the chosen unit. Rust does not contract a
/// product and a sum into one FMA, so every version gives the same bits.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn medium($($arg: $ty),*) $(-> $ret)? $body
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked here).
                    return unsafe { wide($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA (checked here).
                    return unsafe { medium($($arg),*) };
                }
            }
            $body
        }
    };
}
pub(super) use multiversion;

/// Independent accumulators of the reductions below: a sum or maximum taken in order
/// depends on each previous step, which keeps it in one scalar register.
const LANES: usize = 16;

/// `f` folded over `xs` in [`LANES`] independent accumulators from `init`, which are then
/// folded together (the compiler keeps them in vector registers).
#[inline(always)]
fn lane_fold(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder().iter().fold(init, |a, &x| f(a, x));
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = f(*lane, x);
        }
    }
    lanes.into_iter().fold(rest, f)
}

/// The largest value of `xs` (NaNs ignored, as by [`f32::max`]; `-inf` when empty).
#[inline(always)]
pub(super) fn max_of(xs: &[f32]) -> f32 {
    lane_fold(xs, f32::NEG_INFINITY, f32::max)
}

/// The sum of `xs`, added in [`LANES`] interleaved partial sums.
#[inline(always)]
pub(super) fn sum_of(xs: &[f32]) -> f32 {
    lane_fold(xs, 0.0, |a, x| a + x)
}

/// `e^x` for `x <= 0` (a score minus its row maximum, or `-|x|`), within about 2 ulp of
/// the exact value; `0` below `-87` (and for `-inf`), NaN for NaN.
#[inline(always)]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer, kept in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 split in two so that n * LN2_HI is exact for the n used here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // n in [-126, 0]: the exponent bits of 2^n
    let two_n =
        f32::from_bits(((shifted.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    // e^r for r = x - n ln 2 in [-ln2/2, ln2/2]
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut poly = 1.987_569_2e-4f32;
    poly = poly * r + 1.398_199_9e-3;
    poly = poly * r + 8.333_452e-3;
    poly = poly * r + 4.166_579_6e-2;
    poly = poly * r + 1.666_666_5e-1;
    poly = poly * r + 5.000_000_1e-1;
    let e_r = poly * r * r + r + 1.0;
    if x < -87.0 {
        0.0
    } else {
        e_r * two_n
    }
}

/// The logistic sigmoid `1 / (1 + e^-x)`, within a few ulp of the exact value, from one
/// [`exp_nonpositive`] of `-|x|` (no overflow for either sign); NaN for NaN.
#[inline(always)]
pub(super) fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let r = 1.0 / (1.0 + e);
    if x >= 0.0 {
        r
    } else {
        e * r
    }
}

#[cfg(test)]
mod tests {
    use super::{exp_nonpositive, max_of, sigmoid, sum_of};

    /// The largest error of `f(x) = (ours, exact)` over `xs`, in units in the last place
    /// of the exact value rounded to f32.
    fn worst_ulps(xs: impl Iterator<Item = f32>, f: impl Fn(f32) -> (f32, f64)) -> f64 {
        xs.map(|x| {
            let (ours, exact) = f(x);
            let bits = (exact as f32).to_bits();
            let ulp = (f32::from_bits(bits + 1) - exact as f32) as f64;
            (ours as f64 - exact).abs() / ulp
        })
        .fold(0.0, f64::max)
    }

    /// Over `[-87, 0]` the fast exponential is within 2 ulp of the exact one (measured
    /// against f64), and it maps the masked and out-of-range inputs as documented.
    #[test]
    fn fast_exponential_is_within_two_ulp() {
        let worst = worst_ulps(
            (0..=1_000_000).map(|i| -87.0 * i as f32 / 1_000_000.0),
            |x| (exp_nonpositive(x), (x as f64).exp()),
        );
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-90.0), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    /// The sigmoid against f64 over both signs and the saturated ends.
    #[test]
    fn sigmoid_is_within_four_ulp() {
        let xs = (-1_000_000..=1_000_000).map(|i| 30.0 * i as f32 / 1_000_000.0);
        let worst = worst_ulps(xs, |x| (sigmoid(x), 1.0 / (1.0 + (-(x as f64)).exp())));
        assert!(worst <= 4.0, "worst error {worst} ulp");
        assert_eq!(sigmoid(0.0), 0.5);
        assert_eq!(sigmoid(f32::INFINITY), 1.0);
        assert_eq!(sigmoid(f32::NEG_INFINITY), 0.0);
        assert_eq!(sigmoid(-200.0), 0.0);
        assert!(sigmoid(f32::NAN).is_nan());
    }

    /// The lane-wise reductions against in-order ones, over lengths around the lane count.
    #[test]
    fn lane_reductions_match_in_order_ones() {
        for len in [0, 1, 15, 16, 17, 33, 100] {
            let xs: Vec<f32> = (0..len).map(|i| ((i * 37) % 23) as f32 - 11.5).collect();
            let max = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(max_of(&xs), max);
            // integers and halves: every partial sum is exact in f32
            assert_eq!(sum_of(&xs), xs.iter().sum::<f32>());
        }
        assert_eq!(max_of(&[1.0, f32::NAN, 3.0]), 3.0);
    }
}
