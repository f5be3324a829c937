//! `xgen generate`: continue a prompt, streaming the text, with transformers' `generate` defaults
//! from the model's generation_config.json.

use std::{io::Write, path::PathBuf, time::Instant};

use clap::{Args, ValueEnum};
use rand::{rngs::StdRng, SeedableRng};
use serde_json::json;
use xgen_generate::{
    timings::{add_disk_cache, timings},
    GenerationConfig, Generator, Truncation,
};
use xgen_tokenizer::Specials;

use crate::{
    cache_args::CacheArgs, exit::bad_input, model_args::ModelArgs, sampling_args::SamplingArgs,
    text_input::read_text,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TruncateSide {
    /// Drop the oldest prompt tokens so that prompt + new tokens fit the context.
    Left,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text (special-token strings such as <|endoftext|> are recognised, as in transformers).
    #[arg(long, conflicts_with_all = ["prompt_ids", "file"], required_unless_present_any = ["prompt_ids", "file"])]
    pub prompt: Option<String>,
    /// The prompt as token ids, e.g. 464,995,318.
    #[arg(long, value_delimiter = ',', conflicts_with = "file")]
    pub prompt_ids: Option<Vec<u32>>,
    /// The prompt text from a UTF-8 file (`-` reads stdin): a long document to continue or answer.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Treat special-token strings in --prompt or --file as plain text.
    #[arg(long)]
    pub no_special: bool,
    /// Total length in tokens, prompt included (transformers' max_length; default from
    /// generation_config.json, else 20).
    #[arg(long, conflicts_with = "max_new_tokens")]
    pub max_length: Option<usize>,
    /// New tokens to generate at most.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Report the log-probability of each generated token and of the N most likely alternatives (--json).
    #[arg(long, value_name = "N")]
    pub logprobs: Option<usize>,
    /// Instead of failing when prompt + new tokens exceed the context, drop prompt tokens on this side.
    #[arg(long, value_enum)]
    pub truncate: Option<TruncateSide>,
    /// Print one JSON object at the end instead of streaming text:
    /// {"prompt_ids", "ids", "text", "finish_reason", ...}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let file_text = args.file.as_ref().map(|f| read_text(f)).transpose()?;
    if args.prompt.as_deref().or(file_text.as_deref()) == Some("") {
        return Err(bad_input("the prompt is empty"));
    }
    let loaded = args.model.load()?;
    let (model, tokenizer) = (&loaded.model, &loaded.text.tokenizer);
    let specials = if args.no_special { Specials::AsText } else { Specials::Recognize };
    let prompt = match (args.prompt.as_ref().or(file_text.as_ref()), &args.prompt_ids) {
        (Some(text), _) => tokenizer.encode_with(text, specials),
        (None, Some(ids)) => ids.clone(),
        (None, None) => unreachable!("clap requires --prompt, --prompt-ids or --file"),
    };
    if prompt.is_empty() {
        return Err(bad_input("the prompt is empty"));
    }
    let vocab = model.config().vocab_size;
    if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
        return Err(bad_input(format!(
            "--prompt-ids: {id} is not a token id (the model's vocabulary is 0..{vocab})"
        )));
    }
    let mut config = match &loaded.dir {
        Some(dir) => GenerationConfig::for_model_dir(dir, model.config())?,
        None => GenerationConfig::defaults_for(model.config()),
    };
    loaded.text.add_stops(&mut config);
    if let Some(n) = args.max_length {
        config.max_length = n;
    }
    if args.max_new_tokens.is_some() {
        config.max_new_tokens = args.max_new_tokens;
    }
    config.top_logprobs = args.logprobs;
    config.truncation = if args.truncate.is_some() { Truncation::Left } else { Truncation::Error };
    let config = args.sampling.apply(config, tokenizer, vocab)?;
    // Budget errors (context overflow, no room) are the user's to fix: report them before compute.
    config
        .budget(prompt.len(), model.config().max_position_embeddings)
        .map_err(|e| bad_input(e.to_string()))?;

    let disk = args.cache.open(&loaded.source, model)?;
    let seed = args.sampling.seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    // llama.cpp's timings: the prompt until the first token is chosen, the rest as generation.
    let start = Instant::now();
    let mut first_token = None;
    let mut generator = Generator::new(model, tokenizer);
    if let Some(disk) = &disk {
        generator = generator.with_prompt_cache(disk);
    }
    let out = generator.generate(&prompt, &config, &mut rng, &mut |step| {
        first_token.get_or_insert_with(Instant::now);
        if !args.json && write_error.is_none() {
            if let Err(e) = stdout.write_all(step.text.as_bytes()).and_then(|()| stdout.flush()) {
                write_error = Some(e);
            }
        }
    })?;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    let end = Instant::now();
    let first_token = first_token.unwrap_or(end);
    if args.json {
        let drafts = config.prompt_lookup.map(|_| out.draft);
        let mut timings =
            timings(out.prompt_ids.len(), out.ids.len(), first_token - start, end - first_token, drafts);
        if let Some(disk) = &disk {
            disk.flush(); // the prompt's blocks are on disk: count their bytes
            add_disk_cache(&mut timings, out.restored, disk.stats());
        }
        let mut obj = json!({
            "prompt_ids": out.prompt_ids,
            "ids": out.ids,
            "text": out.text,
            "finish_reason": out.finish_reason.as_str(),
            "seed": seed,
            "usage": {"prompt_tokens": out.prompt_ids.len(), "completion_tokens": out.ids.len()},
            "timings": timings,
        });
        if args.logprobs.is_some() {
            obj["logprobs"] = out
                .logprobs
                .iter()
                .map(|l| json!({"id": l.id, "logprob": l.logprob, "top": l.top.iter().map(|(id, lp)| json!({"id": id, "logprob": lp})).collect::<Vec<_>>()}))
                .collect();
        }
        writeln!(stdout, "{obj}")?;
    } else {
        writeln!(stdout)?;
    }
    Ok(())
}
