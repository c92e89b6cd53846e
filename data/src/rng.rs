//! A tiny, stable, seeded PRNG (SplitMix64) and seed derivation.
//!
//! Every random decision of the data pipeline (shuffles, pair ordering, caption dropout,
//! timesteps, diffusion noise) comes from here, so a run is reproducible bit for bit from
//! its seed on every platform and backend, independently of `rand`'s version.

/// SplitMix64 (Steele, Lea, Flood 2014): 64-bit state, passes BigCrush, trivially seedable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng64 {
    state: u64,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derives one seed from several numbers (a seed and indices such as epoch, offset, row),
/// so that every sample / image gets its own independent stream.
pub fn derive_seed(parts: &[u64]) -> u64 {
    let mut h = 0x6A09_E667_F3BC_C908u64;
    for &p in parts {
        h = finalize(h.wrapping_add(GOLDEN) ^ finalize(p.wrapping_add(GOLDEN)));
    }
    h
}

impl Rng64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator seeded with [`derive_seed`]`(parts)`.
    pub fn from_parts(parts: &[u64]) -> Self {
        Self::new(derive_seed(parts))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        finalize(self.state)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n` (unbiased, by rejection). `n` must be > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng64::below needs n > 0");
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Integer in `0..n` (n > 0) by widening multiplication, without rejection (bias below
    /// `n / 2^64`): one draw per call. The shapes set uses it, so its samples never change.
    pub fn below_widening(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// `true` with probability `p`.
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.next_f64() < p
    }

    /// Fills `out` with standard normal samples (Box-Muller over this generator).
    pub fn fill_normal(&mut self, out: &mut [f32]) {
        let mut chunks = out.chunks_mut(2);
        for pair in &mut chunks {
            // u1 in (0, 1] so that ln(u1) is finite.
            let u1 = 1.0 - self.next_f64();
            let u2 = self.next_f64();
            let r = (-2.0 * u1.ln()).sqrt();
            let theta = std::f64::consts::TAU * u2;
            pair[0] = (r * theta.cos()) as f32;
            if pair.len() > 1 {
                pair[1] = (r * theta.sin()) as f32;
            }
        }
    }

    /// A uniformly random permutation of `0..n` (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<u32> {
        let mut p: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            p.swap(i, j);
        }
        p
    }
}
