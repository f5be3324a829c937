//! When generation ends, and stop strings caught even when split across tokens: text that could be
//! the start of a stop string is held back until it is known not to be one, so a stop string is
//! never emitted, in part or whole.

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (eos) was generated.
    Eos,
    /// The token budget (`max_length` / `max_new_tokens`) ran out.
    Length,
    /// A stop string appeared in the text.
    Stop,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eos => "eos",
            Self::Length => "length",
            Self::Stop => "stop",
        }
    }
}

/// Streaming text filter for stop strings.
#[derive(Clone, Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received but not yet released: a suffix that may begin a stop string.
    held: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    /// Adds `text`; returns the text now safe to emit and whether a stop string was found (the
    /// emitted text then ends right before it and nothing more may be pushed).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        let first_stop = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first_stop {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self.longest_partial_suffix();
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// Releases what is held back (at the end of generation).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Byte length of the longest suffix of `held` that is a proper prefix of a stop string.
    fn longest_partial_suffix(&self) -> usize {
        let held = &self.held;
        self.stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(move |(i, _)| &s[..i]))
            .filter(|prefix| held.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_stop_string_is_caught_and_never_emitted() {
        let mut s = StopStrings::new(vec!["###".into(), "\nUser:".into()]);
        assert_eq!(s.push("Hello #"), ("Hello ".to_string(), false));
        assert_eq!(s.push("#"), (String::new(), false));
        assert_eq!(s.push("# Human"), (String::new(), true));
    }

    #[test]
    fn a_false_start_is_released() {
        let mut s = StopStrings::new(vec!["###".into()]);
        assert_eq!(s.push("a##"), ("a".to_string(), false));
        assert_eq!(s.push("b"), ("##b".to_string(), false));
        assert_eq!(s.push("#"), (String::new(), false));
        assert_eq!(s.finish(), "#");
    }

    #[test]
    fn streamed_text_equals_the_whole() {
        let stops = vec!["STOP".to_string(), "éé".to_string()];
        let text = "xSTxéSTOéSTOPafter";
        for split in 1..text.len() {
            if !text.is_char_boundary(split) {
                continue;
            }
            let mut s = StopStrings::new(stops.clone());
            let (a, stop_a) = s.push(&text[..split]);
            let (b, stop_b) = if stop_a { (String::new(), true) } else { s.push(&text[split..]) };
            assert!(stop_a || stop_b);
            assert_eq!(a + &b, "xSTxéSTOé", "split at {split}");
        }
    }
}
