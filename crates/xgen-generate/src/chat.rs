//! The XGen-Inst conversation format (`xgen-7b-8k-inst` model card):
//! `header + "### Human: " + message + "\n###"`; the model continues with ` Assistant: …` and ends
//! at `<|endoftext|>` or when it starts the next `###` turn. Earlier turns are kept in the same
//! shape: `### Human: …\n### Assistant: …\n`.

/// The model card's system header.
pub const DEFAULT_HEADER: &str = "A chat between a curious human and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the human's questions.\n\n";

/// The stop string that ends an answer when the model begins the next turn.
pub const TURN_SEPARATOR: &str = "###";

/// A multi-turn conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    header: String,
    /// Completed (human, assistant) turns.
    turns: Vec<(String, String)>,
}

impl Default for Conversation {
    fn default() -> Self {
        Self::new(DEFAULT_HEADER)
    }
}

impl Conversation {
    pub fn new(header: &str) -> Self {
        Self { header: header.to_string(), turns: Vec::new() }
    }

    /// The prompt that asks the model to answer `message` after the turns so far.
    pub fn prompt(&self, message: &str) -> String {
        let mut p = self.header.clone();
        for (human, assistant) in &self.turns {
            p.push_str(&format!("### Human: {human}\n### Assistant: {assistant}\n"));
        }
        p.push_str(&format!("### Human: {message}\n{TURN_SEPARATOR}"));
        p
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

/// Incrementally strips the leading ` Assistant:` from streamed text.
#[derive(Clone, Debug, Default)]
pub struct AnswerStream {
    /// Text held while it may still be the beginning of ` Assistant:`.
    head: String,
    started: bool,
}

impl AnswerStream {
    /// Returns the part of `text` that belongs to the answer.
    pub fn push(&mut self, text: &str) -> String {
        if self.started {
            return text.to_string();
        }
        self.head.push_str(text);
        let trimmed = self.head.trim_start();
        const PREFIX: &str = "Assistant:";
        if PREFIX.starts_with(trimmed) {
            return String::new();
        }
        self.started = true;
        let rest = trimmed.strip_prefix(PREFIX).unwrap_or(trimmed).trim_start().to_string();
        self.head.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_card_prompt_and_turns() {
        let mut c = Conversation::default();
        let first = c.prompt("Hi");
        assert_eq!(first, format!("{DEFAULT_HEADER}### Human: Hi\n###"));
        c.push_turn("Hi", "Hello!");
        assert_eq!(
            c.prompt("More"),
            format!("{DEFAULT_HEADER}### Human: Hi\n### Assistant: Hello!\n### Human: More\n###")
        );
        assert_eq!(Conversation::new("SYS\n").prompt("x"), "SYS\n### Human: x\n###");
        assert!(c.forget_oldest() && !c.forget_oldest());
        assert_eq!(c.prompt("x"), format!("{DEFAULT_HEADER}### Human: x\n###"));
    }

    #[test]
    fn messages_render_like_a_conversation() {
        let mut c = Conversation::default();
        c.push_turn("Hi", "Hello!");
        let msgs = [(Role::User, "Hi"), (Role::Assistant, "Hello!"), (Role::User, "More")];
        assert_eq!(render_messages(&msgs).unwrap(), c.prompt("More"));
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
}
