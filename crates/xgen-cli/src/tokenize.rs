//! `xgen tokenize` and `xgen detokenize`.

use std::io::{self, BufWriter, Read, Write};

use serde::{Deserialize, Serialize};
use xgen_tokenizer::{Specials, TokenId};

use crate::{
    cli::{DetokenizeArgs, TokenizeArgs},
    exit::bad_input,
    jsonl,
};

#[derive(Deserialize)]
struct TextLine {
    text: String,
}

#[derive(Serialize)]
struct IdsLine<'a> {
    ids: &'a [TokenId],
}

#[derive(Deserialize)]
struct IdsIn {
    ids: Vec<i64>,
}

#[derive(Serialize)]
struct TextOut<'a> {
    text: &'a str,
}

pub fn tokenize(args: &TokenizeArgs) -> anyhow::Result<()> {
    let tokenizer = args.tokenizer.tokenizer()?;
    let specials = if args.no_special { Specials::AsText } else { Specials::Recognize };
    let mut out = BufWriter::new(io::stdout().lock());
    if args.jsonl {
        jsonl::map_lines(&mut io::stdin().lock(), &mut out, |line, n| {
            let TextLine { text } = serde_json::from_str(line).map_err(|e| {
                bad_input(format!("line {n}: expected {{\"text\": string}}: {}", json_error(&e)))
            })?;
            let ids = tokenizer.encode_with(&text, specials);
            Ok(serde_json::to_string(&IdsLine { ids: &ids })?)
        })?;
    } else {
        let text = match &args.text {
            Some(t) => t.clone(),
            None => read_stdin_text()?,
        };
        let ids = tokenizer.encode_with(&text, specials);
        serde_json::to_writer(&mut out, &ids)?;
        out.write_all(b"\n")?;
    }
    Ok(out.flush()?)
}

pub fn detokenize(args: &DetokenizeArgs) -> anyhow::Result<()> {
    let tokenizer = args.tokenizer.tokenizer()?;
    let n_vocab = tokenizer.n_vocab();
    let mut out = BufWriter::new(io::stdout().lock());
    if args.jsonl {
        jsonl::map_lines(&mut io::stdin().lock(), &mut out, |line, n| {
            let IdsIn { ids } = serde_json::from_str(line).map_err(|e| {
                bad_input(format!("line {n}: expected {{\"ids\": [integer, ...]}}: {}", json_error(&e)))
            })?;
            let ids = check_ids(&ids, n_vocab).map_err(|e| bad_input(format!("line {n}: {e}")))?;
            let text = tokenizer.decode(&ids)?;
            Ok(serde_json::to_string(&TextOut { text: &text })?)
        })?;
    } else {
        let input = read_stdin_text()?;
        let ids: Vec<i64> = serde_json::from_str(&input)
            .map_err(|e| bad_input(format!("stdin: expected a JSON array of token ids: {e}")))?;
        let ids = check_ids(&ids, n_vocab).map_err(|e| bad_input(format!("stdin: {e}")))?;
        out.write_all(tokenizer.decode(&ids)?.as_bytes())?;
    }
    Ok(out.flush()?)
}

/// Ids as the tokenizer's type, or a message naming the first one out of range.
fn check_ids(ids: &[i64], n_vocab: u32) -> Result<Vec<TokenId>, String> {
    ids.iter()
        .enumerate()
        .map(|(i, &id)| {
            TokenId::try_from(id).ok().filter(|&id| id < n_vocab).ok_or_else(|| {
                format!("id {id} at index {i} is out of range: the vocabulary has ids 0..{n_vocab}")
            })
        })
        .collect()
}

/// A serde_json error with its position as a column only (each JSON line is one line).
fn json_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let msg = msg.rsplit_once(" at line ").map_or(msg.as_str(), |(m, _)| m);
    format!("{msg} (column {})", e.column())
}

fn read_stdin_text() -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    io::stdin().lock().read_to_end(&mut bytes)?;
    String::from_utf8(bytes).map_err(|e| bad_input(format!("stdin: not valid UTF-8: {}", e.utf8_error())))
}
