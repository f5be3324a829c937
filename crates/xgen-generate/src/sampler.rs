//! Choosing the next token from a row of logits: greedy, or sampling after transformers' warpers
//! in their order — temperature, top-k, top-p, min-p. Sees logits and an RNG only.

use rand::Rng;

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    /// The highest logit; ties go to the lowest id (`torch.argmax`).
    Greedy,
    /// A draw from the softmax of the warped logits.
    Sample(SampleParams),
}

/// transformers' sampling warpers. Defaults are `GenerationConfig`'s: temperature 1, top-k 50,
/// top-p 1, min-p off.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleParams {
    /// Logits are divided by this (> 0).
    pub temperature: f32,
    /// Keep only the k highest logits (ties with the k-th kept); `None` = all.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability mass reaches `top_p` (0, 1].
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 = off.
    pub min_p: f32,
}

impl Default for SampleParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: Some(50), top_p: 1.0, min_p: 0.0 }
    }
}

/// The index of the largest value, the lowest index on ties; NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Picks the next token.
pub fn sample(logits: &[f32], sampling: &Sampling, rng: &mut impl Rng) -> u32 {
    match sampling {
        Sampling::Greedy => argmax(logits),
        Sampling::Sample(p) => {
            let candidates = warp(logits, p);
            draw(&candidates, rng)
        }
    }
}

/// The tokens that survive the warpers with their probabilities (summing to 1), most likely first.
pub fn warp(logits: &[f32], p: &SampleParams) -> Vec<(u32, f32)> {
    // (scaled logit, id), most likely first; ties keep the lower id first.
    let mut c: Vec<(f32, u32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, x)| !x.is_nan())
        .map(|(i, &x)| (x / p.temperature, i as u32))
        .collect();
    if c.is_empty() {
        return vec![(0, 1.0)];
    }
    let by_logit = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if let Some(k) = p.top_k.filter(|&k| k > 0 && k < c.len()) {
        c.select_nth_unstable_by(k - 1, by_logit);
        let kth = c[k - 1].0;
        // transformers removes only logits strictly below the k-th: ties with it stay.
        c.retain(|x| x.0 >= kth);
    }
    c.sort_unstable_by(by_logit);
    let max = c[0].0;
    let mut probs: Vec<f64> = c.iter().map(|x| ((x.0 - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    let mut keep = c.len();
    if p.top_p < 1.0 {
        // transformers: drop the least likely tokens whose cumulative mass (from the bottom) is
        // at most 1 - top_p; the most likely token always stays.
        let mut below = 0.0;
        for i in (1..c.len()).rev() {
            below += probs[i];
            if below > 1.0 - p.top_p as f64 {
                break;
            }
            keep = i;
        }
    }
    if p.min_p > 0.0 {
        let floor = p.min_p as f64 * probs[0];
        keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
    }
    let total: f64 = probs[..keep].iter().sum();
    c[..keep].iter().zip(&probs).map(|(x, q)| (x.1, (q / total) as f32)).collect()
}

/// A draw from `(id, probability)` pairs.
fn draw(candidates: &[(u32, f32)], rng: &mut impl Rng) -> u32 {
    let mut u: f32 = rng.random();
    for &(id, p) in candidates {
        if u < p {
            return id;
        }
        u -= p;
    }
    candidates.last().map_or(0, |c| c.0)
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, SeedableRng};

    use super::*;

    fn params(top_k: Option<usize>, top_p: f32, min_p: f32) -> SampleParams {
        SampleParams { temperature: 1.0, top_k, top_p, min_p }
    }

    #[test]
    fn argmax_takes_the_lowest_id_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5]), 1);
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let logits = [0.0f32, 1.0, 2.0, -1.0];
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        let mut rng = StdRng::seed_from_u64(7);
        let n = 200_000;
        let mut counts = [0usize; 4];
        let sampling = Sampling::Sample(params(None, 1.0, 0.0));
        for _ in 0..n {
            counts[sample(&logits, &sampling, &mut rng) as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let want = (logits[i] as f64).exp() / z;
            let got = c as f64 / n as f64;
            // 5 standard deviations of a binomial proportion.
            let sd = (want * (1.0 - want) / n as f64).sqrt();
            assert!((got - want).abs() < 5.0 * sd, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn temperature_sharpens() {
        let logits = [0.0f32, 1.0];
        let hot = warp(&logits, &SampleParams { temperature: 2.0, ..params(None, 1.0, 0.0) });
        let cold = warp(&logits, &SampleParams { temperature: 0.5, ..params(None, 1.0, 0.0) });
        assert!(cold[0].1 > hot[0].1);
        assert!((cold[0].1 - 1.0 / (1.0 + (-2f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let mut rng = StdRng::seed_from_u64(1);
        for seed in 0..50u64 {
            let logits: Vec<f32> =
                (0..100).map(|i| ((i as u64 * 7919 + seed * 104729) % 1000) as f32 / 100.0).collect();
            let greedy = argmax(&logits);
            assert_eq!(sample(&logits, &Sampling::Sample(params(Some(1), 1.0, 0.0)), &mut rng), greedy);
            assert_eq!(sample(&logits, &Sampling::Sample(params(None, 1e-6, 0.0)), &mut rng), greedy);
            assert_eq!(sample(&logits, &Sampling::Sample(params(None, 1.0, 1.0)), &mut rng), greedy);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probs 0.5, 0.3, 0.15, 0.05
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let ids = |c: Vec<(u32, f32)>| c.into_iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(ids(warp(&logits, &params(None, 0.79, 0.0))), [0, 1]);
        assert_eq!(ids(warp(&logits, &params(None, 0.81, 0.0))), [0, 1, 2]);
        assert_eq!(ids(warp(&logits, &params(Some(3), 1.0, 0.0))), [0, 1, 2]);
        assert_eq!(ids(warp(&logits, &params(None, 1.0, 0.5))), [0, 1]);
        let kept = warp(&logits, &params(None, 0.79, 0.0));
        assert!((kept[0].1 - 0.625).abs() < 1e-6, "renormalised: {kept:?}");
    }
}
