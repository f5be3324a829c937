//! Chat formats: the XGen-Inst conversation format (`xgen-7b-8k-inst` model card) for XGen
//! models, or a model's own template ([`ChatTemplate`]).
//!
//! XGen-Inst: `header + "### Human: " + message + "\n###"`; the model continues with
//! ` Assistant: …` and ends at `<|endoftext|>` or when it starts the next `###` turn. Earlier turns
//! are kept in the same shape: `### Human: …\n### Assistant: …\n`.

use crate::chat_template::{ChatTemplate, Message, TemplateError};

/// The model card's system header.
pub const DEFAULT_HEADER: &str = "A chat between a curious human and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the human's questions.\n\n";

/// The stop string that ends an answer when the model begins the next turn.
pub const TURN_SEPARATOR: &str = "###";

/// How a model's chat prompts are written.
#[derive(Debug)]
pub enum ChatFormat {
    /// XGen's models without a template of their own.
    XgenInst,
    /// The model's own template (boxed: an environment is large).
    Template(Box<ChatTemplate>),
    /// A model with neither: chat is refused with a message saying so.
    Missing,
}

impl ChatFormat {
    /// The model's Jinja chat template, when it has one (XGen-Inst is built in, not a template).
    pub fn template_source(&self) -> Option<&str> {
        match self {
            ChatFormat::Template(t) => Some(t.source()),
            ChatFormat::XgenInst | ChatFormat::Missing => None,
        }
    }

    /// The prompt that asks the model to answer after `messages` (the last one the user's for
    /// XGen-Inst; templates decide for themselves).
    pub fn render(&self, messages: &[(Role, &str)]) -> Result<String, TemplateError> {
        match self {
            ChatFormat::XgenInst => render_messages(messages)
                .ok_or_else(|| TemplateError("the last message must be the user's".to_string())),
            ChatFormat::Template(t) => {
                let msgs: Vec<Message> = messages
                    .iter()
                    .map(|(role, content)| Message {
                        role: role.name().to_string(),
                        content: content.to_string(),
                    })
                    .collect();
                t.render(&msgs, true)
            }
            ChatFormat::Missing => Err(TemplateError(
                "this model has no chat template (no tokenizer.chat_template / chat_template); \
                 use completions with a prompt instead"
                    .to_string(),
            )),
        }
    }

    /// Stop strings that end an answer (`###` for XGen-Inst; templates end at end-of-turn tokens).
    pub fn stop_strings(&self) -> Vec<String> {
        match self {
            ChatFormat::XgenInst => vec![TURN_SEPARATOR.to_string()],
            ChatFormat::Template(_) | ChatFormat::Missing => Vec::new(),
        }
    }

    /// The answer from generated text.
    pub fn clean_answer(&self, generated: &str) -> String {
        match self {
            ChatFormat::XgenInst => clean_answer(generated),
            ChatFormat::Template(_) | ChatFormat::Missing => generated.trim().to_string(),
        }
    }

    /// A filter for streamed answer text.
    pub fn answer_stream(&self) -> AnswerStream {
        match self {
            ChatFormat::XgenInst => AnswerStream::default(),
            ChatFormat::Template(_) | ChatFormat::Missing => AnswerStream::leading_space(),
        }
    }
}

/// A multi-turn conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    /// The system header (XGen-Inst) or system message (templates).
    header: Option<String>,
    /// Completed (human, assistant) turns.
    turns: Vec<(String, String)>,
}

impl Default for Conversation {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Conversation {
    /// A conversation under `header` (XGen-Inst: the text before the turns, the model card's
    /// when `None`; templates: a system message when given).
    pub fn new(header: Option<&str>) -> Self {
        Self { header: header.map(str::to_string), turns: Vec::new() }
    }

    /// The prompt that asks the model to answer `message` after the turns so far.
    pub fn prompt(&self, format: &ChatFormat, message: &str) -> Result<String, TemplateError> {
        if let ChatFormat::XgenInst = format {
            let mut p = self.header.clone().unwrap_or_else(|| DEFAULT_HEADER.to_string());
            for (human, assistant) in &self.turns {
                p.push_str(&format!("### Human: {human}\n### Assistant: {assistant}\n"));
            }
            p.push_str(&format!("### Human: {message}\n{TURN_SEPARATOR}"));
            return Ok(p);
        }
        let mut messages: Vec<(Role, &str)> =
            self.header.iter().map(|h| (Role::System, h.as_str())).collect();
        for (human, assistant) in &self.turns {
            messages.push((Role::User, human));
            messages.push((Role::Assistant, assistant));
        }
        messages.push((Role::User, message));
        format.render(&messages)
    }

    /// Records a completed turn (the answer as returned by [`clean_answer`]).
    pub fn push_turn(&mut self, message: &str, answer: &str) {
        self.turns.push((message.to_string(), answer.to_string()));
    }

    /// Forgets the oldest completed turn (to fit the context); false when there is none.
    pub fn forget_oldest(&mut self) -> bool {
        if self.turns.is_empty() {
            return false;
        }
        self.turns.remove(0);
        true
    }

    pub fn turns(&self) -> &[(String, String)] {
        &self.turns
    }
}

/// Who wrote a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role's name in OpenAI messages and chat templates.
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// Renders OpenAI-style messages in the XGen-Inst format: system messages replace the header
/// (joined, followed by a blank line), user and assistant turns become `### Human:` and
/// `### Assistant:` lines, and the prompt ends with `###` for the model to answer. Returns `None`
/// unless the last message is the user's.
pub fn render_messages(messages: &[(Role, &str)]) -> Option<String> {
    if messages.last().map(|m| m.0) != Some(Role::User) {
        return None;
    }
    let system: Vec<&str> = messages.iter().filter(|m| m.0 == Role::System).map(|m| m.1).collect();
    let mut p =
        if system.is_empty() { DEFAULT_HEADER.to_string() } else { format!("{}\n\n", system.join("\n")) };
    for (role, content) in messages {
        match role {
            Role::System => {}
            Role::User => p.push_str(&format!("### Human: {content}\n")),
            Role::Assistant => p.push_str(&format!("### Assistant: {content}\n")),
        }
    }
    p.push_str(TURN_SEPARATOR);
    Some(p)
}

/// The answer from generated text: without the leading ` Assistant:` and surrounding whitespace.
pub fn clean_answer(generated: &str) -> String {
    let t = generated.trim_start();
    t.strip_prefix("Assistant:").unwrap_or(t).trim().to_string()
}

/// Incrementally strips the leading ` Assistant:` (XGen-Inst) or leading whitespace (templates)
/// from streamed text.
#[derive(Clone, Debug)]
pub struct AnswerStream {
    /// Text held while it may still be the beginning of the prefix.
    head: String,
    started: bool,
    prefix: &'static str,
}

impl Default for AnswerStream {
    fn default() -> Self {
        Self { head: String::new(), started: false, prefix: "Assistant:" }
    }
}

impl AnswerStream {
    /// Strips only leading whitespace.
    pub fn leading_space() -> Self {
        Self { prefix: "", ..Self::default() }
    }

    /// Returns the part of `text` that belongs to the answer.
    pub fn push(&mut self, text: &str) -> String {
        if self.started {
            return text.to_string();
        }
        self.head.push_str(text);
        let trimmed = self.head.trim_start();
        if self.prefix.starts_with(trimmed) {
            return String::new();
        }
        self.started = true;
        let rest = trimmed.strip_prefix(self.prefix).unwrap_or(trimmed).trim_start().to_string();
        self.head.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_card_prompt_and_turns() {
        let x = &ChatFormat::XgenInst;
        let mut c = Conversation::default();
        let first = c.prompt(x, "Hi").unwrap();
        assert_eq!(first, format!("{DEFAULT_HEADER}### Human: Hi\n###"));
        c.push_turn("Hi", "Hello!");
        assert_eq!(
            c.prompt(x, "More").unwrap(),
            format!("{DEFAULT_HEADER}### Human: Hi\n### Assistant: Hello!\n### Human: More\n###")
        );
        assert_eq!(Conversation::new(Some("SYS\n")).prompt(x, "x").unwrap(), "SYS\n### Human: x\n###");
        assert!(c.forget_oldest() && !c.forget_oldest());
        assert_eq!(c.prompt(x, "x").unwrap(), format!("{DEFAULT_HEADER}### Human: x\n###"));
    }

    #[test]
    fn messages_render_like_a_conversation() {
        let mut c = Conversation::default();
        c.push_turn("Hi", "Hello!");
        let msgs = [(Role::User, "Hi"), (Role::Assistant, "Hello!"), (Role::User, "More")];
        assert_eq!(render_messages(&msgs).unwrap(), c.prompt(&ChatFormat::XgenInst, "More").unwrap());
        let with_system = [(Role::System, "Be brief."), (Role::User, "x")];
        assert_eq!(render_messages(&with_system).unwrap(), "Be brief.\n\n### Human: x\n###");
        assert_eq!(render_messages(&[(Role::User, "x"), (Role::Assistant, "y")]), None);
    }

    #[test]
    fn answers_are_cleaned() {
        assert_eq!(clean_answer(" Assistant: Paris is the capital. "), "Paris is the capital.");
        assert_eq!(clean_answer("Sure."), "Sure.");
        let mut s = AnswerStream::default();
        let streamed: String = [" Assis", "tant", ":", " Par", "is"].iter().map(|p| s.push(p)).collect();
        assert_eq!(streamed, "Paris");
        let mut s = AnswerStream::default();
        assert_eq!(s.push(" Yes"), "Yes");
    }

    #[test]
    fn templates_see_the_conversation_as_messages() {
        let src = "{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}";
        let f = ChatFormat::Template(Box::new(ChatTemplate::new(src, "", "").unwrap()));
        let mut c = Conversation::new(Some("Be brief."));
        c.push_turn("Hi", "Hello!");
        assert_eq!(
            c.prompt(&f, "More").unwrap(),
            "[system:Be brief.][user:Hi][assistant:Hello!][user:More]>"
        );
        assert_eq!(Conversation::default().prompt(&f, "x").unwrap(), "[user:x]>");
        assert!(ChatFormat::Missing.render(&[(Role::User, "x")]).unwrap_err().0.contains("no chat template"));
        assert_eq!(f.clean_answer(" Paris.\n"), "Paris.");
        let mut s = f.answer_stream();
        let streamed: String = [" ", " Par", "is"].iter().map(|p| s.push(p)).collect();
        assert_eq!(streamed, "Paris");
    }
}
