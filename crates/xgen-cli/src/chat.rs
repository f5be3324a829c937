//! `xgen chat`: a multi-turn conversation in the model's chat template (the XGen-Inst format for
//! XGen models), one message per input line, interactive on a terminal or from piped stdin.
//! Answers are printed without the prompt and special tokens; each ends at an end-of-turn token
//! (XGen-Inst: `<|endoftext|>`, the leading ` Assistant:` dropped, or the next `###`).
//! Ctrl-C during a turn stops it (the turn is left out of the conversation, what was read stays
//! in the cache for the next one); Ctrl-C while waiting for a message ends the chat.

use std::{
    io::{BufRead, IsTerminal, Write},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use clap::Args;
use rand::{rngs::StdRng, SeedableRng};
use xgen_generate::{
    chat::Conversation, timings::timings, GenerationConfig, Generator, ModelText, SampleParams, Sampling,
    Session, SpecialText,
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
    /// After each answer, llama.cpp's timings as a JSON line on stderr (`prompt_n`, `cache_n`:
    /// prompt tokens taken from the conversation's cache or the disk cache, `prompt_ms`,
    /// `predicted_n`, ...).
    #[arg(long)]
    pub timings: bool,
}

/// Ctrl-C: stops the turn in progress (sets `cancel`) while `in_turn`, else ends the process
/// with the shell's status for SIGINT (130).
fn on_ctrl_c(in_turn: Arc<AtomicBool>, cancel: Arc<AtomicBool>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Registered before returning, so that no Ctrl-C falls between this call and the listener.
    let mut interrupts = rt.block_on(async { signal(SignalKind::interrupt()) })?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            while interrupts.recv().await.is_some() {
                if in_turn.load(Ordering::SeqCst) {
                    cancel.store(true, Ordering::SeqCst);
                } else {
                    std::process::exit(130);
                }
            }
        })
    });
    Ok(())
}

/// The conversation's prompt with `message` as the next turn, leaving room for an answer of at
/// least a quarter of the context (the oldest turns are forgotten when needed); a message that
/// alone leaves no room is bad input.
fn fit_prompt(
    conversation: &mut Conversation,
    text: &ModelText,
    message: &str,
    with_document: bool,
    args: &ChatArgs,
    context: usize,
) -> anyhow::Result<Vec<u32>> {
    let render = |c: &Conversation| c.prompt(&text.chat, message).map_err(|e| bad_input(e.to_string()));
    let mut prompt = text.tokenizer.encode(&render(conversation)?);
    while prompt.len() + args.max_new_tokens.min(context / 4) > context && conversation.forget_oldest() {
        eprintln!(
            "xgen: the conversation no longer fits the context of {context} tokens: dropped the oldest turn"
        );
        prompt = text.tokenizer.encode(&render(conversation)?);
    }
    if prompt.len() >= context {
        let what = if with_document { "the document and message" } else { "the message" };
        return Err(bad_input(format!(
            "{what} are {} tokens with the header: beyond the context of {context}",
            prompt.len()
        )));
    }
    Ok(prompt)
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
    let (in_turn, cancel) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    on_ctrl_c(in_turn.clone(), cancel.clone())?;
    let mut generator = Generator::new(model, tokenizer).cancellable(&cancel);
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
        let fits =
            fit_prompt(&mut conversation, &loaded.text, message, with_document.is_some(), args, context);
        let prompt = fits?;
        let room = context - prompt.len();
        let config = GenerationConfig { max_new_tokens: Some(args.max_new_tokens.min(room)), ..base.clone() };
        let mut answer = format.answer_stream();
        let (start, mut first_token) = (Instant::now(), None);
        cancel.store(false, Ordering::SeqCst);
        in_turn.store(true, Ordering::SeqCst);
        // The conversation's cache carries over: a turn computes only its new tokens.
        let out = generator.generate_in(&mut session, &prompt, &config, &mut rng, &mut |step| {
            first_token.get_or_insert_with(Instant::now);
            let text = answer.push(step.text);
            // A closed stdout ends the chat at the next read; nothing useful to do here.
            let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
        });
        in_turn.store(false, Ordering::SeqCst);
        let out = match out {
            Err(e) if e.is_cancelled() => {
                writeln!(stdout)?;
                eprintln!(
                    "xgen: interrupted; {} tokens of the conversation stay cached for the next message",
                    session.cached()
                );
                continue;
            }
            other => other?,
        };
        writeln!(stdout)?;
        if args.timings {
            let (end, first) = (Instant::now(), first_token.unwrap_or_else(Instant::now));
            let mut t = timings(out.prompt_ids.len(), out.ids.len(), first - start, end - first, None);
            t["cache_n"] = session.reused().into();
            eprintln!("{t}");
        }
        conversation.push_turn(message, &format.clean_answer(&out.text));
        // The document is part of the first turn from now on.
        document = None;
    }
    Ok(())
}
