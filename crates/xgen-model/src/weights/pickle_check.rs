//! Checks a torch checkpoint's pickle (`*/data.pkl` in its zip) before candle's reader runs it.
//! candle trusts two arguments that the file controls (fuzzing found both): a `LONG1` of more than
//! 8 bytes overflows its shift (a panic with overflow checks, a wrong integer without), and a
//! `BINUNICODE` length is allocated before the bytes are read (4 GiB for a 5-byte pickle). This
//! walks the opcodes candle knows, stepping over their arguments, and refuses those two; whatever
//! else is wrong (unknown opcodes, a truncated stream) is left to candle's own errors.

use std::{
    io::{BufReader, Read},
    path::Path,
};

use crate::error::{ModelError, Result};

/// A `data.pkl` larger than this is refused (a 7B checkpoint's is about 100 KB).
const MAX_PICKLE: u64 = 256 << 20;

/// Checks every `data.pkl` of the zip at `file`; not a zip: nothing to check (candle says so).
pub(crate) fn check(file: &Path) -> Result<()> {
    let f = std::fs::File::open(file).map_err(|e| ModelError::io(file, e))?;
    let Ok(mut zip) = zip::ZipArchive::new(BufReader::new(f)) else { return Ok(()) };
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .collect();
    for name in names {
        let Ok(entry) = zip.by_name(&name) else { continue };
        let mut pickle = Vec::new();
        entry
            .take(MAX_PICKLE + 1)
            .read_to_end(&mut pickle)
            .map_err(|e| ModelError::format(file, format!("{name}: {e}")))?;
        if pickle.len() as u64 > MAX_PICKLE {
            return Err(ModelError::format(file, format!("{name}: larger than {MAX_PICKLE} bytes")));
        }
        walk(&pickle).map_err(|why| ModelError::format(file, format!("{name}: {why}")))?;
    }
    Ok(())
}

/// Steps through the opcodes of `p` up to STOP.
fn walk(p: &[u8]) -> std::result::Result<(), String> {
    let mut i = 0;
    while let Some(&op) = p.get(i) {
        let at = i;
        i += 1;
        let rest = &p[i..];
        let arg = match op {
            b'.' => return Ok(()), // STOP
            // PROTO, BININT1, BINPUT, BINGET; BININT2; BININT, LONG_BINGET, LONG_BINPUT; BINFLOAT
            0x80 | b'K' | b'q' | b'h' => 1,
            b'M' => 2,
            b'J' | b'j' | b'r' => 4,
            b'G' => 8,
            b'X' => {
                let Some(len) = rest.get(..4) else { return Ok(()) };
                let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
                if len > rest.len() - 4 {
                    return Err(format!(
                        "BINUNICODE at byte {at} claims {len} bytes, but {} follow",
                        rest.len() - 4
                    ));
                }
                4 + len
            }
            0x8a => {
                let Some(&n) = rest.first() else { return Ok(()) };
                if n > 8 {
                    return Err(format!("LONG1 at byte {at} has {n} bytes (more than a 64-bit integer)"));
                }
                1 + n as usize
            }
            // GLOBAL: module and name, each ending at a newline.
            b'c' => match rest.iter().enumerate().filter(|(_, &b)| b == b'\n').nth(1) {
                Some((end, _)) => end + 1,
                None => return Ok(()),
            },
            // Opcodes without arguments.
            b')'
            | b'R'
            | b'('
            | b't'
            | b'Q'
            | b'N'
            | 0x85..=0x89
            | b's'
            | b'u'
            | b'}'
            | b'd'
            | b'b'
            | 0x81
            | b']'
            | b'a'
            | b'e' => 0,
            _ => return Ok(()), // candle refuses an opcode it does not know
        };
        i += arg;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::walk;

    #[test]
    fn refuses_what_candle_trusts_and_passes_the_rest() {
        // PROTO 2, EMPTY_DICT, BINUNICODE "ab", LONG1 of 2 bytes, SETITEM, STOP.
        let good = [0x80, 2, b'}', b'X', 2, 0, 0, 0, b'a', b'b', 0x8a, 2, 1, 0, b's', b'.'];
        assert_eq!(walk(&good), Ok(()));
        let long = [0x80, 2, 0x8a, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, b'.'];
        assert!(walk(&long).unwrap_err().contains("LONG1 at byte 2 has 9 bytes"));
        let unicode = [b'X', 0xff, 0xff, 0xff, 0xff, b'a', b'.'];
        assert!(walk(&unicode).unwrap_err().contains("claims 4294967295 bytes, but 2 follow"));
        // A GLOBAL's lines are stepped over whole: its bytes are not opcodes.
        let global = b"ctorch._utils\n_rebuild_tensor_v2\n\x8a\x09.";
        assert!(walk(global).unwrap_err().contains("at byte 33"));
        assert_eq!(walk(b"c\x8a\x09\n\x8a\n."), Ok(()));
    }
}
