//! Logit processors that depend on the tokens so far: repetition penalty (transformers'
//! definition, over prompt and generated tokens), presence and frequency penalties (OpenAI's,
//! over generated tokens), and a fixed logit bias.

use std::collections::HashMap;

/// Penalty strengths; the default changes nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct Penalties {
    /// transformers' `repetition_penalty` (> 0; 1 = off): a seen token's logit is divided by it
    /// when positive and multiplied by it when negative.
    pub repetition: f32,
    /// Subtracted once from the logit of every token generated so far.
    pub presence: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency: f32,
    /// Added to the logits of the given ids.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for Penalties {
    fn default() -> Self {
        Self { repetition: 1.0, presence: 0.0, frequency: 0.0, logit_bias: Vec::new() }
    }
}

impl Penalties {
    pub fn is_noop(&self) -> bool {
        *self == Self::default()
    }
}

/// The token history a sequence's penalties need.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Every token of the prompt and the output, for the repetition penalty.
    seen: HashMap<u32, ()>,
    /// Generated tokens and their counts.
    generated: HashMap<u32, u32>,
}

impl History {
    pub fn new(prompt: &[u32]) -> Self {
        Self { seen: prompt.iter().map(|&t| (t, ())).collect(), generated: HashMap::new() }
    }

    pub fn accept(&mut self, token: u32) {
        self.seen.insert(token, ());
        *self.generated.entry(token).or_default() += 1;
    }

    /// Applies `p` to `logits` in place.
    pub fn apply(&self, p: &Penalties, logits: &mut [f32]) {
        if p.repetition != 1.0 {
            for &t in self.seen.keys() {
                if let Some(x) = logits.get_mut(t as usize) {
                    *x = if *x < 0.0 { *x * p.repetition } else { *x / p.repetition };
                }
            }
        }
        if p.presence != 0.0 || p.frequency != 0.0 {
            for (&t, &n) in &self.generated {
                if let Some(x) = logits.get_mut(t as usize) {
                    *x -= p.presence + p.frequency * n as f32;
                }
            }
        }
        for &(t, bias) in &p.logit_bias {
            if let Some(x) = logits.get_mut(t as usize) {
                *x += bias;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_move_the_right_logits() {
        let mut h = History::new(&[0, 1]);
        h.accept(2);
        h.accept(2);
        let p = Penalties {
            repetition: 2.0,
            presence: 0.5,
            frequency: 0.25,
            logit_bias: vec![(4, 10.0), (99, 1.0)],
        };
        let mut logits = [4.0f32, -4.0, 4.0, 4.0, 0.0];
        h.apply(&p, &mut logits);
        // 0: repetition only (prompt); 1: negative -> multiplied; 2: /2 then -0.5 - 2 * 0.25;
        // 3: untouched; 4: bias. Id 99 is outside the vocabulary and ignored.
        assert_eq!(logits, [2.0, -8.0, 1.0, 4.0, 10.0]);
        let mut unchanged = [1.0f32, 2.0];
        History::new(&[0, 1]).apply(&Penalties::default(), &mut unchanged);
        assert_eq!(unchanged, [1.0, 2.0]);
    }
}
