//! How many of its drafted tokens each sequence verifies in the next step: the lengths that
//! maximize the step's expected tokens per second, from each sequence's measured acceptance and
//! the step times measured as they run (this project's measured rule; transformers' schedule
//! grows and shrinks the draft without looking at what a row costs).
//!
//! The model. A sequence whose drafted tokens are each accepted with chance `a` (given the ones
//! before were) gains `a^j` expected tokens from its `j`-th drafted token, on top of the one token
//! every sequence gets per step. A step of `R` rows takes `c(R)` seconds. The plan adds drafted
//! tokens in order of gain (within a sequence that order is its draft's) and keeps the count that
//! gives the most expected tokens per second, plain steps included: where a row costs little
//! (AVX-512 hosts: 8 rows 1.7-2.3x one) long drafts pay at modest acceptance; where rows cost
//! nearly their share (AVX2 hosts: 2 rows 1.3x, 8 rows 3.6x) only drafts likely to be accepted
//! run, and a batch that already has many rows drafts little. Output is unaffected: drafts only
//! decide how many positions one forward pass verifies.
//!
//! Invariants: the plan never exceeds a sequence's available draft or [`EXACT_ROWS`] rows in all
//! (so every row runs on the exact few-row kernels); with no measured one-row step it drafts
//! nothing (the first step measures it); a row count never measured is priced like its nearest
//! measured neighbours (optimistically, so it gets tried and measured).

use xgen_model::kernels::EXACT_ROWS;

/// A sequence's chance that a drafted token is accepted, given the ones before it were: an
/// exponential moving average over the drafted positions it has verified, and over the position
/// after each verified draft whose lookup reached further (the model's own token there shows, for
/// free, whether one more drafted token would have been accepted), so a sequence that stopped
/// drafting still notices when its answer starts to copy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Acceptance {
    rate: f64,
}

impl Acceptance {
    /// Where a sequence starts: even odds.
    const PRIOR: f64 = 0.5;
    /// Weight of each observation: the rate follows about the last 5 (answers switch between
    /// copying a passage and writing their own words within a few tokens).
    const WEIGHT: f64 = 0.2;

    pub fn new() -> Self {
        Self { rate: Self::PRIOR }
    }

    /// One drafted (or would-be drafted) token, accepted or not.
    pub fn observe(&mut self, accepted: bool) {
        self.rate += Self::WEIGHT * (f64::from(u8::from(accepted)) - self.rate);
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }
}

impl Default for Acceptance {
    fn default() -> Self {
        Self::new()
    }
}

/// Forward-step times by row count (1..=[`EXACT_ROWS`]), as measured.
#[derive(Clone, Debug, Default)]
pub struct StepCosts {
    /// Per row count `r` (index `r - 1`): its last [`Self::WINDOW`] times in seconds, newest last.
    seen: [Vec<f64>; EXACT_ROWS],
}

impl StepCosts {
    /// Times kept per row count; the estimate is their minimum (noise only adds time: another
    /// process's burst, a page fault), and recent (a step's cost grows with the context).
    const WINDOW: usize = 4;

    /// A step of `rows` rows took `seconds` (steps of more rows than the plan uses are ignored).
    pub fn record(&mut self, rows: usize, seconds: f64) {
        if !(1..=EXACT_ROWS).contains(&rows) || !seconds.is_finite() || seconds <= 0.0 {
            return;
        }
        let seen = &mut self.seen[rows - 1];
        if seen.len() == Self::WINDOW {
            seen.remove(0);
        }
        seen.push(seconds);
    }

    fn measured(&self, rows: usize) -> Option<f64> {
        self.seen[rows - 1].iter().copied().reduce(f64::min)
    }

    /// The expected seconds of a `rows`-row step: measured, else interpolated between the nearest
    /// measured row counts below and above, else the nearest one's (flat: an optimistic price,
    /// so the row count gets tried); never below a step of fewer rows' (a noisy low figure must
    /// not make useless rows look free). `None` before any step was measured.
    pub fn estimate(&self, rows: usize) -> Option<f64> {
        (1..=rows.clamp(1, EXACT_ROWS)).filter_map(|r| self.priced(r)).reduce(f64::max)
    }

    /// [`Self::estimate`] without the floor of smaller steps.
    fn priced(&self, rows: usize) -> Option<f64> {
        if let Some(c) = self.measured(rows) {
            return Some(c);
        }
        let below = (1..rows).rev().find_map(|r| self.measured(r).map(|c| (r, c)));
        let above = (rows + 1..=EXACT_ROWS).find_map(|r| self.measured(r).map(|c| (r, c)));
        match (below, above) {
            (Some((r0, c0)), Some((r1, c1))) => Some(c0 + (c1 - c0) * (rows - r0) as f64 / (r1 - r0) as f64),
            (Some((_, c)), None) | (None, Some((_, c))) => Some(c),
            (None, None) => None,
        }
    }
}

/// What one sequence brings to a step: the tokens its lookup drafted (`available`) and its
/// acceptance rate.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub available: usize,
    pub rate: f64,
}

/// A plan must beat plain steps (and each shorter plan) by this fraction of expected tokens per
/// second: the estimates are noisy, and a near-tie is not worth a longer step's latency.
const MARGIN: f64 = 0.02;

/// Drafted tokens to verify per sequence in a step where every sequence feeds its last token
/// (one row each) and `plan[s]` of sequence `s`'s drafted tokens.
pub fn plan(costs: &StepCosts, seqs: &[Candidate]) -> Vec<usize> {
    let mut lengths = vec![0; seqs.len()];
    let base = seqs.len();
    let Some(plain) = costs.measured(1).and(costs.estimate(base)) else {
        return lengths;
    };
    // Every drafted token's expected gain, largest first; within a sequence, in draft order.
    let mut gains: Vec<(f64, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(s, c)| {
            let rate = c.rate.clamp(0.0, 1.0);
            (1..=c.available).map(move |j| (rate.powi(j as i32), s))
        })
        .collect();
    gains.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut tokens, mut best, mut take) = (base as f64, base as f64 / plain, 0);
    for (i, &(gain, _)) in gains.iter().take(EXACT_ROWS.saturating_sub(base)).enumerate() {
        tokens += gain;
        let Some(cost) = costs.estimate(base + i + 1) else { break };
        let speed = tokens / cost;
        if speed > best * (1.0 + MARGIN) {
            (best, take) = (speed, i + 1);
        }
    }
    for &(_, s) in &gains[..take] {
        lengths[s] += 1;
    }
    lengths
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(ms: &[(usize, f64)]) -> StepCosts {
        let mut c = StepCosts::default();
        for &(rows, t) in ms {
            c.record(rows, t / 1e3);
        }
        c
    }

    fn ms_of(c: &StepCosts, rows: usize) -> f64 {
        c.estimate(rows).unwrap() * 1e3
    }

    fn one(available: usize, rate: f64) -> Candidate {
        Candidate { available, rate }
    }

    #[test]
    fn acceptance_follows_what_it_observes() {
        let mut a = Acceptance::new();
        (0..30).for_each(|_| a.observe(true));
        assert!(a.rate() > 0.99);
        (0..3).for_each(|_| a.observe(false));
        assert!((0.4..0.6).contains(&a.rate()), "three misses halve it: {}", a.rate());
        (0..30).for_each(|_| a.observe(false));
        assert!(a.rate() < 0.01);
    }

    #[test]
    fn estimates_take_the_minimum_and_interpolate_between_measured_rows() {
        let c = costs(&[(1, 10.0), (1, 12.0), (1, 30.0), (4, 19.0), (8, 35.0)]);
        let ms = |r| c.estimate(r).unwrap() * 1e3;
        assert!((ms(1) - 10.0).abs() < 1e-9, "a noisy step does not raise the estimate");
        assert!((ms(2) - 13.0).abs() < 1e-9 && (ms(3) - 16.0).abs() < 1e-9);
        assert!((ms(6) - 27.0).abs() < 1e-9);
        assert!((ms(12) - 35.0).abs() < 1e-9, "past the last measured: its price");
        assert_eq!(StepCosts::default().estimate(3), None);
        // More rows never cost less: a noisy low 3-row figure is priced as the 2-row step.
        let c = costs(&[(1, 10.0), (2, 13.0), (3, 9.0), (5, 20.0)]);
        assert!((ms_of(&c, 3) - 13.0).abs() < 1e-9 && (ms_of(&c, 4) - 14.5).abs() < 1e-9);
        assert_eq!(plan(&c, &[one(6, 0.0)]), [0], "drafts that cannot be accepted never run");
        // Only the last WINDOW times count: the old minimum leaves.
        let mut c = costs(&[(2, 5.0)]);
        (0..StepCosts::WINDOW).for_each(|_| c.record(2, 0.009));
        assert!((c.estimate(2).unwrap() - 0.009).abs() < 1e-12);
    }

    #[test]
    fn nothing_is_drafted_before_a_plain_step_was_measured() {
        assert_eq!(plan(&StepCosts::default(), &[one(6, 0.9)]), [0]);
        assert_eq!(plan(&costs(&[(7, 20.0)]), &[one(6, 0.9)]), [0]);
    }

    #[test]
    fn cheap_rows_take_long_drafts_and_costly_rows_short_or_none() {
        // Unmeasured longer steps priced like the plain one: the whole draft is tried.
        assert_eq!(plan(&costs(&[(1, 10.0)]), &[one(6, 0.5)]), [6]);
        // A memory-bound host: 8 rows cost 1.2x one.
        let flat = costs(&[(1, 10.0), (8, 12.0)]);
        assert_eq!(plan(&flat, &[one(7, 0.9)]), [7]);
        // An AVX2 host: rows cost about their share past two.
        let steep = costs(&[(1, 10.0), (2, 13.2), (3, 18.0), (4, 19.4), (8, 35.6)]);
        assert_eq!(plan(&steep, &[one(6, 0.2)]), [0], "1.2 tokens for 1.32x the time");
        assert_eq!(plan(&steep, &[one(6, 0.6)]), [1]);
        // 0.95: 2, 2.9, 3.8 tokens for 1.32, 1.8, 1.94x: three drafted tokens.
        assert_eq!(plan(&steep, &[one(6, 0.95)]), [3]);
        assert_eq!(plan(&steep, &[one(2, 0.95)]), [2], "never past what was drafted");
        assert_eq!(plan(&steep, &[one(0, 0.95)]), [0]);
    }

    #[test]
    fn a_batch_drafts_where_acceptance_is_likeliest_and_within_the_exact_rows() {
        // 3 ms per row past the first.
        let steep =
            costs(&[(1, 10.0), (2, 13.0), (5, 22.0), (EXACT_ROWS, 10.0 + 3.0 * (EXACT_ROWS - 1) as f64)]);
        // Three rows already: one more costs 19/16, so only likely drafts pay.
        let got = plan(&steep, &[one(4, 0.3), one(4, 0.99), one(4, 0.5)]);
        assert_eq!(got, [0, 4, 0]);
        // Cheap rows: every draft, but no more rows than EXACT_ROWS in all.
        let flat = costs(&[(1, 10.0), (EXACT_ROWS, 10.5)]);
        let got = plan(&flat, &[one(14, 0.9), one(14, 0.8)]);
        assert_eq!(got.iter().sum::<usize>(), EXACT_ROWS - 2);
        assert!(got[0] >= got[1], "{got:?}");
        let full: Vec<Candidate> = (0..EXACT_ROWS).map(|_| one(5, 1.0)).collect();
        assert!(plan(&flat, &full).iter().all(|&k| k == 0));
    }
}
