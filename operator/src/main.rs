//! `vectorpipe-operator`: reconciles EmbeddingPipelines into worker Deployments and reports their
//! status. `crds` prints the CustomResourceDefinitions.

use vectorpipe_operator::{context, controllers, http, leader, metrics};

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
        /// The Prometheus server for ScalingPolicies whose spec names none.
        #[arg(long, env = "VECTORPIPE_PROMETHEUS_URL")]
        prometheus_url: Option<String>,
        /// A YAML map of Bedrock model ids to US dollars per 1,000 input tokens, over the built-in
        /// prices, for pipeline budgets (`spec.budget.maxCostPerDay`) and cost metrics.
        #[arg(long, env = "VECTORPIPE_PRICE_TABLE")]
        price_table: Option<std::path::PathBuf>,
        /// Log as JSON lines or as text.
        #[arg(long, env = "VECTORPIPE_LOG_FORMAT", default_value = "json")]
        log_format: LogFormat,
        /// Watch only these namespaces (comma-separated); empty: the whole cluster.
        #[arg(long, env = "VECTORPIPE_WATCH_NAMESPACES", default_value = "")]
        watch_namespaces: String,
        /// Act only while holding the leader Lease, so several replicas are safe.
        #[arg(long, env = "VECTORPIPE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
        leader_election: bool,
        /// The leader Lease's namespace (the operator's own, in a cluster).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// The leader Lease's name.
        #[arg(
            long,
            env = "VECTORPIPE_LEASE_NAME",
            default_value = "vectorpipe-operator"
        )]
        lease_name: String,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

/// How `run` is configured.
struct RunOptions {
    metrics_address: SocketAddr,
    worker_image: String,
    prometheus_url: Option<String>,
    prices: controllers::embedding_pipeline::budget::PriceTable,
    scope: context::Scope,
    leader: Option<leader::Election>,
}

async fn run(options: RunOptions) -> anyhow::Result<()> {
    let config = kube::Config::infer().await?;
    // The controllers write only while this replica surely leads; the election itself does not
    // pass the fence.
    let fence = match options.leader {
        Some(_) => leader::Fence::closed(),
        None => leader::Fence::open(),
    };
    let election_client = kube::Client::try_from(config.clone())?;
    let client = fence.client(config)?;
    let (metrics, registry) = metrics::Metrics::new();
    let bound = http::serve(options.metrics_address, registry).await?;
    // One set of readers (with their Prometheus clients) for scaling policies and budgets.
    let readers: Arc<dyn controllers::scaling_policy::readers::MetricReaders> = Arc::new(Arc::new(
        controllers::scaling_policy::readers::LiveReaders::default(),
    ));
    let ctx = Arc::new(
        context::Context::new(
            client.clone(),
            options.scope.clone(),
            controllers::embedding_pipeline::build::Defaults {
                worker_image: options.worker_image,
            },
            metrics,
        )
        .with_spend(context::Spend {
            prometheus: options.prometheus_url.clone(),
            readers: readers.clone(),
            prices: options.prices,
        }),
    );
    match &options.scope {
        context::Scope::Cluster => {
            tracing::info!(metrics = %bound, "operator started, watching every namespace")
        }
        context::Scope::Namespaces(list) => {
            tracing::info!(metrics = %bound, namespaces = %list.join(","), "operator started, watching only these namespaces")
        }
    }
    let controllers = async {
        tokio::join!(
            controllers::embedding_pipeline::run(ctx.clone()),
            controllers::scaling_policy::run(ctx.clone(), readers, options.prometheus_url),
        );
    };
    match options.leader {
        None => controllers.await,
        Some(election) => {
            leader::run_as_leader(election_client, election, fence, controllers).await?
        }
    }
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
            prometheus_url,
            price_table,
            log_format,
            watch_namespaces,
            leader_election,
            lease_namespace,
            lease_name,
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
            let leader = leader_election.then_some(leader::Election {
                namespace: lease_namespace,
                name: lease_name,
            });
            let prices = match price_table {
                None => controllers::embedding_pipeline::budget::PriceTable::default(),
                Some(path) => {
                    let text = std::fs::read_to_string(&path).map_err(|e| {
                        anyhow::anyhow!("reading the price table {}: {e}", path.display())
                    })?;
                    controllers::embedding_pipeline::budget::PriceTable::with_overrides(&text)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
                }
            };
            tokio::runtime::Runtime::new()?.block_on(run(RunOptions {
                metrics_address,
                worker_image,
                prometheus_url,
                prices,
                scope: context::Scope::parse(&watch_namespaces),
                leader,
            }))
        }
    }
}
