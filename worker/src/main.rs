//! `vectorpipe-worker`: the data plane of one EmbeddingPipeline.
//!
//! The Kafka → Bedrock → OpenSearch loop and the laptop mode land in later increments; today the
//! binary checks a pipeline file the way the worker will read it at start-up.

mod config;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Command-line interface.
#[derive(Parser, Debug)]
#[command(name = "vectorpipe-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Parse and check a pipeline file (an EmbeddingPipeline manifest or its spec).
    Check {
        /// The pipeline file.
        #[arg(long, env = "VECTORPIPE_PIPELINE_FILE")]
        pipeline: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { pipeline } => match config::load(&pipeline) {
            Ok(spec) => {
                println!(
                    "{}: ok (model {}, index {})",
                    pipeline.display(),
                    spec.embedding.bedrock.model_id,
                    spec.sink.opensearch.index
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}
