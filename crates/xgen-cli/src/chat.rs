//! `xgen chat`: a multi-turn conversation in the model's chat template (the XGen-Inst format for
//! XGen models), one message per input line, interactive on a terminal or from piped stdin.
//! Answers are printed without the prompt and special tokens; each ends at an end-of-turn token
//! (XGen-Inst: `<|endoftext|>`, the leading ` Assistant:` dropped, or the next `###`).

use std::{
    io::{BufRead, IsTerminal, Write},
    path::PathBuf,
};

use clap::Args;
use rand::{rngs::StdRng, SeedableRng};
use xgen_generate::{
    chat::Conversation, GenerationConfig, Generator, SampleParams, Sampling, Session, SpecialText,
};

use crate::{
    cache_args::CacheArgs,
    exit::bad_input,
    model_args::ModelArgs,
    sampling_args::SamplingArgs,
    text_input::{is_stdin, read_text},
};

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The system header placed before the conversation (XGen-Inst; default: the model card's),
    /// or the system message of a model's own template.
    #[arg(long)]
    pub header: Option<String>,
    /// A UTF-8 text file placed before the first message ("summarize this"): the document, a blank
    /// line, then the message, in the first turn.
    #[arg(long, value_name = "FILE")]
    pub document: Option<PathBuf>,
    /// Longest answer, in tokens (the model card uses 2048).
    #[arg(long, default_value_t = 2048)]
    pub max_new_tokens: usize,
    /// Sampling defaults follow the model card (top-k 100, temperature 1); --greedy for determinism.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
}

pub fn run(args: &ChatArgs) -> anyhow::Result<()> {
    let mut document = match &args.document {
        Some(path) if is_stdin(path) => {
            return Err(bad_input("--document -: stdin carries the messages; name a file"));
        }
        Some(path) => Some(read_text(path)?),
        None => None,
    };
    let loaded = args.model.load()?;
    let (model, tokenizer, format) = (&loaded.model, &loaded.text.tokenizer, &loaded.text.chat);
    let context = model.config().max_position_embeddings;
    let mut card = GenerationConfig {
        sampling: Sampling::Sample(SampleParams { top_k: Some(100), ..SampleParams::default() }),
        stop_strings: format.stop_strings(),
        special_text: SpecialText::Skip,
        ..GenerationConfig::defaults_for(model.config())
    };
    loaded.text.add_stops(&mut card);
    let base = args.sampling.apply(card, tokenizer, model.config().vocab_size)?;
    let mut rng = StdRng::seed_from_u64(args.sampling.seed());
    let disk = args.cache.open(&loaded.source, model)?;
    let mut generator = Generator::new(model, tokenizer);
    if let Some(disk) = &disk {
        // A document read once: the next `xgen chat --document` of it restores its blocks.
        generator = generator.with_prompt_cache(disk);
    }
    let mut session = Session::default();
    let mut conversation = Conversation::new(args.header.as_deref());
    let interactive = std::io::stdin().is_terminal();
    let mut stdout = std::io::stdout().lock();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let message = line.map_err(|e| bad_input(format!("stdin: {e}")))?;
        let message = message.trim();
        if message.is_empty() {
            continue;
        }
        let with_document = document.as_ref().map(|d| format!("{d}\n\n{message}"));
        let message = with_document.as_deref().unwrap_or(message);
        let render = |c: &Conversation| c.prompt(format, message).map_err(|e| bad_input(e.to_string()));
        let mut prompt = tokenizer.encode(&render(&conversation)?);
        // Keep room for an answer of at least a quarter of the context: forget the oldest turns.
        while prompt.len() + args.max_new_tokens.min(context / 4) > context && conversation.forget_oldest() {
            eprintln!("xgen: the conversation no longer fits the context of {context} tokens: dropped the oldest turn");
            prompt = tokenizer.encode(&render(&conversation)?);
        }
        let room = context.saturating_sub(prompt.len());
        if room == 0 {
            let what = if with_document.is_some() { "the document and message" } else { "the message" };
            return Err(bad_input(format!(
                "{what} are {} tokens with the header: beyond the context of {context}",
                prompt.len()
            )));
        }
        let config = GenerationConfig { max_new_tokens: Some(args.max_new_tokens.min(room)), ..base.clone() };
        let mut answer = format.answer_stream();
        // The conversation's cache carries over: a turn computes only its new tokens.
        let out = generator.generate_in(&mut session, &prompt, &config, &mut rng, &mut |step| {
            let text = answer.push(step.text);
            // A closed stdout ends the chat at the next read; nothing useful to do here.
            let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
        })?;
        writeln!(stdout)?;
        conversation.push_turn(message, &format.clean_answer(&out.text));
        // The document is part of the first turn from now on.
        document = None;
    }
    Ok(())
}
