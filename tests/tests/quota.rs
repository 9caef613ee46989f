//! Quota-aware scaling end to end: a backlog the workers cannot drain because Bedrock's quota,
//! not the worker count, bounds throughput. With `quotaAware` the policy learns that a fourth
//! worker adds only throttling and settles at about three, where a plain lag policy would run
//! all eight (`vectorpipe-bench quota` prints both traces side by side).

use std::time::Duration;

use anyhow::{Result, ensure};
use vectorpipe_tests::operator::Operator;
use vectorpipe_tests::{k8s, quota, unique_name};

#[tokio::test(flavor = "multi_thread")]
async fn a_quota_aware_policy_settles_near_the_quota_instead_of_at_max_replicas() -> Result<()> {
    k8s::install_crds()?;
    let dir = std::env::temp_dir().join(unique_name("quota"));
    std::fs::create_dir_all(&dir)?;
    let operator = Operator::start(&dir.join("operator.log"))?;
    let result = quota::run(
        &vectorpipe_tests::worker::binary("vectorpipe-worker")?,
        true,
        40_000,
        Duration::from_secs(170),
    )
    .await;
    let trace = match result {
        Ok(trace) => trace,
        Err(e) => {
            eprintln!("operator log:\n{}", operator.log_text());
            return Err(e);
        }
    };
    eprintln!(
        "one worker alone: {:.1} calls/s; quota {:.1} calls/s",
        trace.one_worker, trace.quota
    );
    for p in &trace.points {
        eprintln!(
            "{:>5.0} s  {} workers  {:>6.1} answered/s  {:>6.1} throttled/s  {}",
            p.seconds, p.workers, p.answered_per_second, p.throttled_per_second, p.reason
        );
    }
    let (status, reason, message) = trace.limited.clone().unwrap_or_default();
    ensure!(
        status == "True" && reason == "QuotaBound" && message.contains("records/s"),
        "ScalingLimited is {status} {reason}: {message}; workers {}",
        trace.workers_line()
    );
    ensure!(
        trace.most < quota::PARTITIONS as usize,
        "the policy ran {} workers: {}",
        trace.most,
        trace.workers_line()
    );
    // The last minute: about three workers, and the quota was what bounded them.
    let tail: Vec<&quota::Point> = trace
        .points
        .iter()
        .filter(|p| p.seconds > trace.points.last().map_or(0.0, |l| l.seconds) - 60.0)
        .collect();
    ensure!(
        tail.iter().all(|p| (2..=4).contains(&p.workers)),
        "not settled near three: {}",
        trace.workers_line()
    );
    ensure!(
        trace.answered_over_last(60.0) > trace.quota * 0.6,
        "the settled count must still use the quota: {:.1} answered/s of {:.1}; {}",
        trace.answered_over_last(60.0),
        trace.quota,
        trace.workers_line()
    );
    Ok(())
}
