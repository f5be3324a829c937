//! Streaming JSON-lines mapping in constant memory, parallel within bounded chunks, order kept.

use std::io::{BufRead, Write};

use rayon::prelude::*;

use crate::exit::bad_input;

/// Lines read and mapped at a time; bounds memory to a chunk of input and output.
const CHUNK_LINES: usize = 2048;
/// A chunk also ends once it holds this many bytes of input.
const CHUNK_BYTES: usize = 8 << 20;

/// Maps each input line through `f` (given the line and its 1-based number) and writes one output
/// line per input line, in order. Stops at the first bad line, after writing the lines before it.
pub fn map_lines<F>(input: &mut impl BufRead, out: &mut impl Write, f: F) -> anyhow::Result<()>
where
    F: Fn(&str, usize) -> anyhow::Result<String> + Sync,
{
    let mut first_line = 1;
    loop {
        let chunk = read_chunk(input)?;
        if chunk.is_empty() {
            return Ok(());
        }
        let mapped: Vec<anyhow::Result<String>> = chunk
            .par_iter()
            .enumerate()
            .map(|(i, raw)| {
                let n = first_line + i;
                let line = std::str::from_utf8(raw)
                    .map_err(|e| bad_input(format!("line {n}: not valid UTF-8 ({e})")))?;
                f(line.trim_end_matches(['\n', '\r']), n)
            })
            .collect();
        for line in mapped {
            out.write_all(line?.as_bytes())?;
            out.write_all(b"\n")?;
        }
        first_line += chunk.len();
    }
}

fn read_chunk(input: &mut impl BufRead) -> std::io::Result<Vec<Vec<u8>>> {
    let mut chunk = Vec::new();
    let mut bytes = 0;
    while chunk.len() < CHUNK_LINES && bytes < CHUNK_BYTES {
        let mut line = Vec::new();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        bytes += line.len();
        chunk.push(line);
    }
    Ok(chunk)
}
