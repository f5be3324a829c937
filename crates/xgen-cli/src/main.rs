//! `xgen`: the command-line front end. Parses arguments, runs one command, maps errors to exit
//! codes (2 for bad usage or bad input, 1 for other failures). The work lives in the libraries.

mod bench;
mod cache_args;
mod chat;
mod cli;
mod convert;
mod eval;
mod exit;
mod generate;
mod jsonl;
mod model_args;
mod perplexity;
mod quantize;
mod sampling_args;
mod serve;
mod text_input;
mod tokenize;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let result = match args.command {
        cli::Command::Tokenize(a) => tokenize::tokenize(&a),
        cli::Command::Detokenize(a) => tokenize::detokenize(&a),
        cli::Command::Generate(a) => generate::run(&a),
        cli::Command::Chat(a) => chat::run(&a),
        cli::Command::Perplexity(a) => perplexity::run(&a),
        cli::Command::Eval(a) => eval::run(&a),
        cli::Command::Convert(a) => convert::run(&a),
        cli::Command::Quantize(a) => quantize::run(&a),
        cli::Command::Bench(a) => bench::run(&a),
        cli::Command::Serve(a) => serve::run(&a),
    };
    exit::report(result)
}
