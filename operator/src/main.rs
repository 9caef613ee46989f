//! `vectorpipe-operator`: reconciles EmbeddingPipelines into worker Deployments and reports their
//! status. `crds` prints the CustomResourceDefinitions.

mod context;
mod controllers;
mod error;
mod http;
mod labels;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

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
    /// Run the controllers (in-cluster config, or KUBECONFIG).
    Run {
        /// Address of /metrics, /healthz, /readyz.
        #[arg(
            long,
            env = "VECTORPIPE_METRICS_ADDRESS",
            default_value = "0.0.0.0:8080"
        )]
        metrics_address: SocketAddr,
        /// The worker image used when a pipeline names none.
        #[arg(long, env = "VECTORPIPE_WORKER_IMAGE", default_value = concat!("ghcr.io/vectorpipe/vectorpipe-worker:", env!("CARGO_PKG_VERSION")))]
        worker_image: String,
        /// Log as JSON lines or as text.
        #[arg(long, env = "VECTORPIPE_LOG_FORMAT", default_value = "json")]
        log_format: LogFormat,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

async fn run(metrics_address: SocketAddr, worker_image: String) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let (metrics, registry) = metrics::Metrics::new();
    let bound = http::serve(metrics_address, registry).await?;
    tracing::info!(metrics = %bound, "starting the controllers");
    let ctx = Arc::new(context::Context::new(
        client,
        controllers::embedding_pipeline::build::Defaults { worker_image },
        metrics,
    ));
    controllers::embedding_pipeline::run(ctx).await;
    tracing::info!("stopped");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds => {
            for (_, yaml) in vectorpipe_crds::crd_yaml() {
                println!("---\n{}", yaml.trim_end());
            }
            Ok(())
        }
        Command::Run {
            metrics_address,
            worker_image,
            log_format,
        } => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr);
            match log_format {
                LogFormat::Json => builder.json().init(),
                LogFormat::Text => builder.init(),
            }
            tokio::runtime::Runtime::new()?.block_on(run(metrics_address, worker_image))
        }
    }
}
