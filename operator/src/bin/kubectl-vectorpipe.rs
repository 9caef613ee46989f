//! `kubectl vectorpipe`: a kubectl plugin for vectorpipe pipelines. Copy the binary onto PATH
//! and kubectl finds it (`kubectl vectorpipe status posts`); it uses kubectl's configuration
//! (KUBECONFIG, the current context and its namespace).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::Api;
use vectorpipe_crds::v1alpha1::{EmbeddingPipeline, ScalingPolicy};
use vectorpipe_operator::plugin;

/// Status, scaling decisions and dead-letter redrives of vectorpipe pipelines.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl-vectorpipe",
    bin_name = "kubectl vectorpipe",
    version,
    about
)]
struct Cli {
    /// The namespace (default: the current context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A pipeline's model, index, workers, lag, freshness, usage, conditions and last scaling
    /// decisions.
    Status {
        /// The EmbeddingPipeline.
        pipeline: String,
    },
    /// Why a ScalingPolicy chose the current worker count: its last decision, the inputs it
    /// used and the rules it applies.
    Explain {
        /// The ScalingPolicy.
        policy: String,
    },
    /// Model migrations: `migrate status <pipeline>`.
    Migrate {
        #[command(subcommand)]
        command: Migrate,
    },
    /// Send a pipeline's dead letters back through it, as a Job made from its worker pods
    /// (same image, config, credentials), and print what it did.
    Redrive {
        /// The EmbeddingPipeline.
        pipeline: String,
        /// Only dead letters of this reason (repeatable or comma-separated).
        #[arg(long, value_delimiter = ',')]
        reason: Vec<String>,
        /// Only dead letters written since: a time (2026-12-01T08:00:00Z) or an age (6h).
        #[arg(long)]
        since: Option<String>,
        /// Only dead letters written before: a time or an age.
        #[arg(long)]
        until: Option<String>,
        /// Only records from this partition of the source topic (repeatable or comma-separated).
        #[arg(long, value_delimiter = ',')]
        partition: Vec<i32>,
        /// The most records to redrive.
        #[arg(long)]
        limit: Option<usize>,
        /// Count what would be redriven; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long the Job may run.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Subcommand, Debug)]
enum Migrate {
    /// The index generations of a pipeline: the one readers search, a migration under way
    /// (phase, records, lag, time left) and the generations kept for going back.
    Status {
        /// The EmbeddingPipeline.
        pipeline: String,
    },
}

/// The time the texts are made at: now, or `VECTORPIPE_PLUGIN_NOW` (RFC 3339), which the
/// README's examples are made with.
fn now() -> anyhow::Result<jiff::Timestamp> {
    match std::env::var("VECTORPIPE_PLUGIN_NOW") {
        Ok(text) => text
            .parse()
            .with_context(|| format!("VECTORPIPE_PLUGIN_NOW={text:?} is not an RFC 3339 time")),
        Err(_) => Ok(jiff::Timestamp::now()),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration: set KUBECONFIG or run kubectl config use-context")?;
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config)?;
    match cli.command {
        Command::Status { pipeline } => {
            let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &namespace);
            let object = pipelines
                .get(&pipeline)
                .await
                .with_context(|| format!("reading EmbeddingPipeline {namespace}/{pipeline}"))?;
            let policy = plugin::policy_of(&client, &namespace, &pipeline).await?;
            print!("{}", plugin::status_text(now()?, &object, policy.as_ref()));
        }
        Command::Migrate {
            command: Migrate::Status { pipeline },
        } => {
            let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client, &namespace);
            let object = pipelines
                .get(&pipeline)
                .await
                .with_context(|| format!("reading EmbeddingPipeline {namespace}/{pipeline}"))?;
            print!("{}", plugin::migrate_status_text(now()?, &object));
        }
        Command::Explain { policy } => {
            let policies: Api<ScalingPolicy> = Api::namespaced(client, &namespace);
            let object = policies
                .get(&policy)
                .await
                .with_context(|| format!("reading ScalingPolicy {namespace}/{policy}"))?;
            print!("{}", plugin::explain_text(now()?, &object));
        }
        Command::Redrive {
            pipeline,
            reason,
            since,
            until,
            partition,
            limit,
            dry_run,
            timeout,
        } => {
            let request = plugin::RedriveRequest {
                reasons: reason,
                since,
                until,
                partitions: partition,
                limit,
                dry_run,
            };
            let report =
                plugin::redrive(&client, &namespace, &pipeline, &request, timeout, |line| {
                    eprintln!("{line}")
                })
                .await?;
            for line in report.lines() {
                println!("{line}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kubectl-vectorpipe: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubectl-vectorpipe: {e:#}");
            ExitCode::FAILURE
        }
    }
}
