//! Runs the fake Bedrock runtime as a process, for benchmarks and manual runs.
//!
//! Prints `listening on 127.0.0.1:PORT` once it accepts calls. Point the AWS SDK at it with
//! `AWS_ENDPOINT_URL_BEDROCK_RUNTIME=http://127.0.0.1:PORT`, `AWS_ACCESS_KEY_ID=AKIDVECTORPIPETEST`
//! and `AWS_SECRET_ACCESS_KEY=vectorpipe-test-secret-key`.

use std::time::Duration;

use clap::Parser;
use vectorpipe_tests::bedrock::FakeBedrock;

/// A Bedrock-compatible test server (InvokeModel for Titan and Cohere embeddings, Converse).
#[derive(Parser, Debug)]
#[command(name = "fake-bedrock")]
struct Args {
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Delay added to every model call.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Answer ThrottlingException above this many calls per second.
    #[arg(long)]
    requests_per_second: Option<f64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    println!("listening on {}", listener.local_addr()?);
    let fake = FakeBedrock::new();
    fake.set_latency(Duration::from_millis(args.latency_ms));
    fake.set_quota(args.requests_per_second);
    fake.serve(listener).await?;
    Ok(())
}
