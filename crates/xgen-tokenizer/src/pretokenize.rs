//! The GPT-2 split pattern, hand-compiled: text -> pieces that BPE encodes independently.
//!
//! tiktoken spells the pattern
//! `'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s`
//! and runs it with a backtracking regex engine (leftmost-first alternation). At a position `i`
//! holding character `c`, the first alternative that matches decides the piece:
//!
//! 1. `c == '\''` followed by `s`, `d`, `m`, `t` (2 bytes) or `ll`, `ve`, `re` (3 bytes);
//! 2. an optional single `' '` then a maximal run of one class: letters `\p{L}`, numbers `\p{N}`,
//!    or "other" (neither whitespace, letter nor number — the apostrophe included);
//! 3. whitespace: the maximal run of `\s` if it reaches the end of the text; else, when the run
//!    has two or more characters, all but its last (which is left to prefix the next word);
//!    else the single character.
//!
//! Character classes come from regex-syntax's Unicode tables (see `build.rs`), the same tables
//! the regex engines behind tiktoken match with. Equality with the regex is checked by a
//! differential test against tiktoken-rs over random text.
//!
//! Performance notes: one pass, no backtracking, no allocation; a class lookup is two table
//! loads. Replacing `fancy-regex` here is where most of the speed-up over tiktoken-rs comes from.

include!(concat!(env!("OUT_DIR"), "/unicode_classes.rs"));

/// The pre-tokenizer's view of a character. Codes match `build.rs`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CharClass {
    Other,
    Letter,
    Number,
    Space,
}

#[inline]
fn class_of(c: char) -> CharClass {
    let cp = c as usize;
    match CLASS_BLOCKS[usize::from(CLASS_INDEX[cp / CLASS_BLOCK])][cp % CLASS_BLOCK] {
        1 => CharClass::Letter,
        2 => CharClass::Number,
        3 => CharClass::Space,
        _ => CharClass::Other,
    }
}

/// Iterator over the pieces of `text`, in order; their concatenation is `text`.
pub(crate) struct Pieces<'a> {
    text: &'a str,
    pos: usize,
}

pub(crate) fn pieces(text: &str) -> Pieces<'_> {
    Pieces { text, pos: 0 }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        let rest = &self.text[self.pos..];
        let mut chars = rest.chars();
        let c = chars.next()?;
        let len = piece_len(rest, c, chars.next());
        self.pos += len;
        Some(&rest[..len])
    }
}

/// Byte length of the piece that starts `rest`; `c` and `next` are its first two characters.
#[inline]
fn piece_len(rest: &str, c: char, next: Option<char>) -> usize {
    if c == '\'' {
        if let Some(n) = contraction_len(&rest.as_bytes()[1..]) {
            return n;
        }
    }
    let class = class_of(c);
    if c == ' ' {
        if let Some(n) = next {
            let next_class = class_of(n);
            if next_class != CharClass::Space {
                return 1 + run_len(&rest[1..], next_class);
            }
        }
    }
    if class != CharClass::Space {
        return run_len(rest, class);
    }
    whitespace_len(rest)
}

/// `'s|'t|'re|'ve|'m|'ll|'d` after the apostrophe: the whole match length.
#[inline]
fn contraction_len(after: &[u8]) -> Option<usize> {
    match after {
        [b's' | b't' | b'm' | b'd', ..] => Some(2),
        [b'l', b'l', ..] | [b'v', b'e', ..] | [b'r', b'e', ..] => Some(3),
        _ => None,
    }
}

/// Length of the maximal run of `class` characters at the start of `s`.
#[inline]
fn run_len(s: &str, class: CharClass) -> usize {
    s.char_indices().find(|&(_, c)| class_of(c) != class).map_or(s.len(), |(i, _)| i)
}

/// `\s++$|\s+(?!\S)|\s` at the start of `s` (which starts with whitespace).
#[inline]
fn whitespace_len(s: &str) -> usize {
    let mut last_start = 0;
    for (count, (i, c)) in s.char_indices().enumerate() {
        if class_of(c) != CharClass::Space {
            // Followed by non-whitespace: leave the last whitespace character for the next piece.
            return if count >= 2 { last_start } else { i };
        }
        last_start = i;
    }
    s.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<&str> {
        pieces(s).collect()
    }

    #[test]
    fn splits_like_the_gpt2_pattern() {
        assert_eq!(split("Hello world"), ["Hello", " world"]);
        assert_eq!(split("it's they'll we'VE"), ["it", "'s", " they", "'ll", " we", "'", "VE"]);
        assert_eq!(split("  x"), [" ", " x"]);
        assert_eq!(split("a   \n\nb"), ["a", "   \n", "\n", "b"]);
        assert_eq!(split("x  "), ["x", "  "]);
        assert_eq!(split("12abc ?!x"), ["12", "abc", " ?!", "x"]);
        assert_eq!(split("''s"), ["''", "s"]);
        assert_eq!(split("\u{3000}x"), ["\u{3000}", "x"]);
        assert_eq!(split("日本語 テキスト"), ["日本語", " テキスト"]);
        assert_eq!(split(""), Vec::<&str>::new());
    }

    #[test]
    fn classes_follow_unicode() {
        assert_eq!(class_of('a'), CharClass::Letter);
        assert_eq!(class_of('é'), CharClass::Letter);
        assert_eq!(class_of('Ⅻ'), CharClass::Number); // Nl
        assert_eq!(class_of('½'), CharClass::Number); // No
        assert_eq!(class_of('\u{85}'), CharClass::Space);
        assert_eq!(class_of('\u{200B}'), CharClass::Other); // ZWSP is not White_Space
        assert_eq!(class_of('\u{10FFFF}'), CharClass::Other);
    }
}
