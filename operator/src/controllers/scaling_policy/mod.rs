//! The ScalingPolicy controller. This increment holds the pure decision engine, schedules, the Kafka lag reader and the PromQL reader; the metric
//! readers, the reconcile loop and the status writer come next.

pub mod decide;
pub mod lag;
pub mod promql;
pub mod schedule;
