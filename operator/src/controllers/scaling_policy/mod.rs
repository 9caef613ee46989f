//! The ScalingPolicy controller. This increment holds the pure decision engine, schedules and the Kafka lag reader; the metric
//! readers, the reconcile loop and the status writer come next.

pub mod decide;
pub mod lag;
pub mod schedule;
