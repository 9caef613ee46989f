//! The ScalingPolicy controller. This increment holds the pure decision engine and schedules; the metric
//! readers, the reconcile loop and the status writer come next.

pub mod decide;
pub mod schedule;
