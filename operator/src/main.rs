//! `vectorpipe-operator`: reconciles EmbeddingPipelines and ScalingPolicies.
//!
//! The controllers land in later increments; today the binary prints the CustomResourceDefinitions
//! it serves, so they can be installed with `vectorpipe-operator crds | kubectl apply
//! --server-side -f -`.

use clap::{Parser, Subcommand};

/// Command-line interface.
#[derive(Parser, Debug)]
#[command(name = "vectorpipe-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions as a multi-document YAML stream.
    Crds,
}

fn main() {
    match Cli::parse().command {
        Command::Crds => {
            for (_, yaml) in vectorpipe_crds::crd_yaml() {
                println!("---\n{}", yaml.trim_end());
            }
        }
    }
}
