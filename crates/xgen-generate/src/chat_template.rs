//! A model's own chat template (GGUF `tokenizer.chat_template`, `chat_template` in
//! `tokenizer_config.json` or `chat_template.jinja`), rendered with minijinja as transformers'
//! `apply_chat_template` renders it: `trim_blocks` and `lstrip_blocks`, Python string methods,
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception(msg)` and
//! `strftime_now(fmt)`.
//!
//! Templates come from files users download, so they run sandboxed: minijinja reads no files
//! (no loader is set) and reaches no network; each render has a fuel budget (instructions), a
//! recursion limit and a cap on the rendered size.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

/// Instructions one render may execute.
const FUEL: u64 = 2_000_000;
/// The largest rendered prompt, in bytes.
const MAX_OUTPUT: usize = 16 << 20;

/// Why a template cannot be used or rendered: the template's own words where it raised.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("chat template: {0}")]
pub struct TemplateError(pub String);

/// One chat message as templates see it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A compiled chat template with the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is a [`TemplateError`] naming line and cause.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(64);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        crate::template_guard::install(&mut env);
        env.add_template_owned("chat", source.to_string()).map_err(describe)?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The prompt for `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, TemplateError> {
        let template = self.env.get_template("chat").map_err(describe)?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        let mut out = Capped(Vec::new());
        template.render_captured_to(ctx, &mut out).map_err(describe)?;
        String::from_utf8(out.0).map_err(|e| TemplateError(e.to_string()))
    }
}

/// The render's output, refused past [`MAX_OUTPUT`].
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT {
            return Err(std::io::Error::other(format!("the rendered prompt exceeds {MAX_OUTPUT} bytes")));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn describe(e: Error) -> TemplateError {
    let mut msg = match e.kind() {
        ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid operation").to_string(),
        ErrorKind::OutOfFuel => "the template ran too long (loop bound reached)".to_string(),
        // The only writer is `Capped`, which fails only past the size cap.
        ErrorKind::WriteFailure => format!("the rendered prompt exceeds {MAX_OUTPUT} bytes"),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (template line {line})"));
    }
    TemplateError(msg)
}

/// Today's date (UTC) formatted with the strftime fields templates use: `%d %m %Y %y %b %B %a
/// %A %H %M %S %%`.
fn strftime_now(format: &str) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600 % 24)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    /// ChatML as HF templates write it; the expected text is the template's definition.
    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        let p = t.render(&[msg("system", "S"), msg("user", "Hi")], true).unwrap();
        assert_eq!(
            p,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(!t.render(&[msg("user", "Hi")], false).unwrap().ends_with("assistant\n"));
    }

    #[test]
    fn blocks_are_trimmed_and_python_methods_work() {
        // Expected values: Python jinja2 3.1 with trim_blocks and lstrip_blocks (transformers').
        let src = "{% for m in messages %}\n  {{ m.content.strip() | upper }}{% if m.role.startswith('us') %}!{% endif %}\n{% endfor %}{{ bos_token }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&[msg("user", " a ")], false).unwrap(), "  A!<s>");
        let src = "{% for m in messages %}\n    {% if m.role == \"user\" %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}";
        assert_eq!(
            ChatTemplate::new(src, "", "").unwrap().render(&[msg("user", "x")], false).unwrap(),
            "[x]\n"
        );
    }

    #[test]
    fn errors_name_the_cause() {
        let raise = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}";
        let t = ChatTemplate::new(raise, "", "").unwrap();
        let err = t.render(&[msg("assistant", "x")], true).unwrap_err();
        assert!(err.0.contains("Conversation roles must alternate"), "{err}");
        let err = ChatTemplate::new("{% for %}", "", "").unwrap_err();
        assert!(err.to_string().starts_with("chat template:") && err.0.contains("line 1"), "{err}");
    }

    #[test]
    fn runaway_templates_stop() {
        let forever = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}";
        let err = ChatTemplate::new(forever, "", "").unwrap().render(&[], true).unwrap_err();
        assert!(err.0.contains("too long"), "{err}");
        let huge = "{% for i in range(10000) %}{{ 'x' * 5000 }}{% endfor %}";
        let err = ChatTemplate::new(huge, "", "").unwrap().render(&[], true).unwrap_err();
        assert!(err.0.contains("exceeds"), "{err}");
        let no_files = "{% include 'secret.txt' %}";
        assert!(ChatTemplate::new(no_files, "", "").unwrap().render(&[], true).is_err());
    }

    #[test]
    fn a_namespace_stored_in_itself_is_an_error_not_a_stack_overflow() {
        // Found by fuzzing: printing such a value recursed until the process aborted.
        let cycle = "{% set ns = namespace(n=0) %}{% set ns.n = ns %}";
        let other = "{% set a = namespace() %}{% set b = namespace(x=[a]) %}{% set a.y = b %}";
        for (setup, use_) in [
            (cycle, "{{ ns.n }}"),
            (cycle, "{{ ns|tojson }}"),
            (cycle, "{{ ns|string }}"),
            (other, "{{ a|pprint }}"),
        ] {
            let err =
                ChatTemplate::new(&format!("{setup}{use_}"), "", "").unwrap().render(&[], true).unwrap_err();
            assert!(err.0.contains("nested more than 64 deep"), "{use_}: {err}");
        }
        // Deep but finite values and plain ones print as before.
        let fine = "{% set ns = namespace(n=1) %}{{ ns.n }} {{ [[1, [2]], {'a': [3]}]|tojson }} {{ messages|tojson }}";
        let out = ChatTemplate::new(fine, "", "").unwrap().render(&[msg("user", "hi")], true).unwrap();
        assert_eq!(out, r#"1 [[1,[2]],{"a":[3]}] [{"role":"user","content":"hi"}]"#);
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(strftime_now("%%").as_str(), "%");
    }
}
