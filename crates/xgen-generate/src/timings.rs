//! llama.cpp's `timings` object, as `xgen generate --json` and the server's completions report
//! it: prompt and generation tokens, milliseconds and speeds, and with prompt lookup the drafted
//! and accepted tokens.

use std::time::Duration;

use serde_json::{json, Value};

use crate::lookup::DraftStats;

/// `prompt_n` tokens read in `prompt`, then `predicted_n` generated in `predicted` (from the
/// first token to the last); `drafts` when the generation speculated.
pub fn timings(
    prompt_n: usize,
    predicted_n: usize,
    prompt: Duration,
    predicted: Duration,
    drafts: Option<DraftStats>,
) -> Value {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let per_second = |n: usize, d: Duration| if d.is_zero() { 0.0 } else { n as f64 / d.as_secs_f64() };
    let mut t = json!({
        "prompt_n": prompt_n,
        "prompt_ms": ms(prompt),
        "prompt_per_second": per_second(prompt_n, prompt),
        "predicted_n": predicted_n,
        "predicted_ms": ms(predicted),
        "predicted_per_second": per_second(predicted_n, predicted),
    });
    if let Some(d) = drafts {
        t["draft_n"] = json!(d.drafted);
        t["draft_n_accepted"] = json!(d.accepted);
    }
    t
}

/// Adds the disk prompt cache's part to `timings`: `cache_n`, the prompt tokens restored instead
/// of computed (llama.cpp's name for prompt tokens taken from a cache), the bytes the cache read
/// and wrote, and the milliseconds restoring took (part of `prompt_ms`).
pub fn add_disk_cache(timings: &mut Value, restored: usize, disk: xgen_kvstore::Stats) {
    timings["cache_n"] = json!(restored);
    timings["disk_read_bytes"] = json!(disk.read_bytes);
    timings["disk_written_bytes"] = json!(disk.written_bytes);
    timings["disk_read_ms"] = json!(disk.read_ms);
}
