//! Text taken from a file, or from stdin for `-`: `--file` of `generate` and `perplexity`,
//! `--document` of `chat`. Unreadable or non-UTF-8 input is bad input naming the file.

use std::{io::Read, path::Path};

use crate::exit::bad_input;

/// The whole of `path` (stdin for `-`) as UTF-8 text.
pub fn read_text(path: &Path) -> anyhow::Result<String> {
    let name = if is_stdin(path) { "stdin".to_string() } else { path.display().to_string() };
    let bytes = if is_stdin(path) {
        let mut buf = Vec::new();
        std::io::stdin().lock().read_to_end(&mut buf).map(|_| buf)
    } else {
        std::fs::read(path)
    };
    let bytes = bytes.map_err(|e| bad_input(format!("{name}: {e}")))?;
    String::from_utf8(bytes).map_err(|e| bad_input(format!("{name}: not valid UTF-8: {}", e.utf8_error())))
}

/// Whether `path` names stdin (`-`).
pub fn is_stdin(path: &Path) -> bool {
    path.as_os_str() == "-"
}
