//! Quota-aware scaling: whether the last scale-out raised throughput. Pure, with the clock
//! passed in.
//!
//! Each poll feeds in the worker count, the records the workers finish per second and the
//! throttled share of their embedding calls, both from Prometheus over `measureWindow` (the
//! group's commits come in bursts, too uneven to compare counts by). A count is measured once it has held for `settleTime + measureWindow`, so a
//! measurement never mixes two counts. Without throttling a scale-out alarm goes ahead at once;
//! while calls are throttled it waits for the current count's measurement. When that shows less
//! than `minGainPercent` more throughput than the count the last scale-out started from, and at
//! least `throttledSharePercent` of calls throttled, the embedding API's quota bounds the
//! pipeline: the policy goes back to the fewest measured workers that reached the same
//! throughput. While that count is itself throttled it tries fewer (as many as the share of
//! calls that got through points to), keeps a count that reaches the throughput and goes up
//! again from one that falls short. The bound holds for `relearnAfter`.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use vectorpipe_crds::v1alpha1::QuotaAware;

/// Throughput and throttling at one worker count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measurement {
    /// Records finished per second.
    pub throughput: f64,
    /// Share of embedding calls throttled, 0 to 1.
    pub throttled_share: f64,
    /// When it was measured.
    pub at: Timestamp,
}

/// A learned bound: more workers than `at` only add throttling.
#[derive(Clone, Debug, PartialEq)]
pub struct Bound {
    /// The count to hold.
    pub at: i32,
    /// When it was learned.
    pub since: Timestamp,
    /// The figures that showed it, for the status.
    pub message: String,
    /// The throughput measured when it was learned.
    pub throughput: f64,
    /// The throughput that counts as reached: the bound's throughput less `minGainPercent`.
    pub reached: f64,
    /// A smaller count being tried: still throttled at `at`, so fewer workers may do as much.
    pub probe: Option<i32>,
    /// The probe went below what reaches the throughput: `at` is the fewest.
    pub settled: bool,
    /// The most workers found to fall short of the throughput (0: none yet).
    pub fell_short: i32,
}

/// What the quota check says about a scale-out alarm.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Nothing known against it: scale out.
    Proceed,
    /// The current count is throttled and not measured yet: wait before adding workers.
    Measuring(String),
    /// The quota bounds throughput: run `.0` workers, for the reason `.1`.
    Bound(i32, String),
}

/// What the controller remembers for quota-aware scaling (lost on restart: it relearns).
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// The count at the last poll, and since when.
    count: Option<(i32, Timestamp)>,
    /// The count the last scale-out started from.
    scaled_out_from: Option<i32>,
    /// The latest measurement per count.
    by_count: BTreeMap<i32, Measurement>,
    /// The bound in force.
    bound: Option<Bound>,
}

fn age(since: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO)
}

fn percent(share: f64) -> String {
    format!("{:.0} %", share * 100.0)
}

impl Ledger {
    /// Records one poll: the count now and, when both were read, the throughput and throttled
    /// share over the measure window.
    pub fn observe(
        &mut self,
        config: &QuotaAware,
        current: i32,
        now: Timestamp,
        throughput: Option<f64>,
        throttled_share: Option<f64>,
    ) {
        match self.count {
            Some((count, _)) if count == current => {}
            previous => {
                self.scaled_out_from = match previous {
                    Some((before, _)) if before < current => Some(before),
                    _ => None,
                };
                self.count = Some((current, now));
            }
        }
        let relearn = config.relearn_after.get();
        self.by_count.retain(|_, m| age(m.at, now) < relearn);
        if self
            .bound
            .as_ref()
            .is_some_and(|b| age(b.since, now) >= relearn)
        {
            self.bound = None;
        }
        let Some((_, since)) = self.count else { return };
        if age(since, now) < config.measure_after() {
            return;
        }
        let (Some(throughput), Some(throttled_share)) = (throughput, throttled_share) else {
            return;
        };
        self.by_count.insert(
            current,
            Measurement {
                throughput,
                throttled_share,
                at: now,
            },
        );
        // More throughput than the bound was learned at: the quota was raised, or the records
        // became cheaper to embed. Scaling out may help again.
        if let Some(bound) = &self.bound
            && current <= bound.at
            && throughput > bound.throughput * (1.0 + config.min_gain_percent / 100.0)
        {
            self.bound = None;
        }
    }

    /// The measurement of `count` taken since the count last changed to it.
    fn measured_now(&self, count: i32) -> Option<&Measurement> {
        let (current, since) = self.count?;
        self.by_count
            .get(&count)
            .filter(|m| current == count && m.at >= since)
    }

    /// The bound in force, if any.
    pub fn bound(&self) -> Option<&Bound> {
        self.bound.as_ref()
    }

    /// Judges a scale-out alarm at `current` workers, with the throttled share read now and
    /// the fewest workers the policy allows; learns a bound when the figures show one.
    pub fn judge(
        &mut self,
        config: &QuotaAware,
        current: i32,
        latest_share: Option<f64>,
        floor: i32,
        now: Timestamp,
    ) -> Verdict {
        let throttles = |share: f64| share * 100.0 >= config.throttled_share_percent;
        if let Some(mut bound) = self.bound.take() {
            let verdict = self.hold(config, &mut bound, current, floor);
            self.bound = Some(bound);
            if let Some(verdict) = verdict {
                return verdict;
            }
        }
        if !latest_share.is_some_and(throttles) {
            return Verdict::Proceed; // no sign of a quota
        }
        let Some(after) = self.measured_now(current).copied() else {
            return Verdict::Measuring(format!(
                "{} of embedding calls are throttled: measuring the throughput at {current} workers ({} after the change) before adding more",
                percent(latest_share.unwrap_or_default()),
                humantime::format_duration(config.measure_after()),
            ));
        };
        let Some((from, before)) = self
            .scaled_out_from
            .filter(|from| *from < current)
            .and_then(|from| Some((from, *self.by_count.get(&from)?)))
        else {
            return Verdict::Proceed; // nothing to compare with
        };
        let gain = config.min_gain_percent / 100.0;
        let helped = after.throughput > before.throughput * (1.0 + gain);
        if helped || !throttles(after.throttled_share) {
            return Verdict::Proceed;
        }
        // The fewest workers measured that reached the same throughput.
        let reached = after.throughput * (1.0 - gain);
        let (at, best) = self
            .by_count
            .range(..=current)
            .find(|(_, m)| m.throughput >= reached)
            .map(|(count, m)| (*count, *m))
            .unwrap_or((from, before));
        let message = format!(
            "Bedrock's quota bounds throughput: {current} workers process {:.1} records/s with {} of embedding calls throttled, {from} workers processed {:.1} records/s with {}; holding {at} workers ({:.1} records/s) for {}",
            after.throughput,
            percent(after.throttled_share),
            before.throughput,
            percent(before.throttled_share),
            best.throughput,
            humantime::format_duration(config.relearn_after.get()),
        );
        let mut bound = Bound {
            at,
            since: now,
            message,
            throughput: after.throughput,
            reached,
            probe: None,
            settled: false,
            fell_short: 0,
        };
        let verdict = self
            .hold(config, &mut bound, current, floor)
            .unwrap_or(Verdict::Bound(at, bound.message.clone()));
        self.bound = Some(bound);
        verdict
    }

    /// The count a bound holds a scale-out alarm at; None when the alarm may proceed (below
    /// the bound). While the bound's count is throttled, fewer workers may do as much: it tries
    /// the count the throttled share points to (the workers times the share that got through),
    /// keeps a count that reaches the throughput and goes up again from one that falls short.
    fn hold(
        &self,
        config: &QuotaAware,
        bound: &mut Bound,
        current: i32,
        floor: i32,
    ) -> Option<Verdict> {
        let throttles = |share: f64| share * 100.0 >= config.throttled_share_percent;
        let trying = |probe: i32, bound: &Bound| {
            Verdict::Bound(
                probe,
                format!(
                    "{}; trying {probe} workers, as {} is still throttled",
                    bound.message, bound.at
                ),
            )
        };
        if let Some(probe) = bound.probe {
            if current != probe {
                return Some(trying(probe, bound));
            }
            let Some(m) = self.measured_now(probe).copied() else {
                return Some(trying(probe, bound));
            };
            bound.probe = None;
            if m.throughput >= bound.reached {
                bound.at = probe;
                bound.message = format!(
                    "{}; {probe} workers reach it too ({:.1} records/s)",
                    bound.message, m.throughput
                );
            } else {
                bound.fell_short = bound.fell_short.max(probe);
                if probe + 1 < bound.at {
                    bound.probe = Some(probe + 1);
                    return Some(trying(probe + 1, bound));
                }
                bound.settled = true;
                bound.message = format!(
                    "{}; {probe} workers fell to {:.1} records/s, so {} is the fewest",
                    bound.message, m.throughput, bound.at
                );
                return Some(Verdict::Bound(bound.at, bound.message.clone()));
            }
        }
        if current < bound.at {
            return None;
        }
        let lowest = floor.max(bound.fell_short + 1);
        let basis = self
            .by_count
            .get(&bound.at)
            .or_else(|| self.measured_now(current));
        if !bound.settled
            && bound.at > lowest
            && let Some(m) = basis.filter(|m| throttles(m.throttled_share))
        {
            let through = f64::from(bound.at) * (1.0 - m.throttled_share);
            let probe = (through.ceil() as i32).clamp(lowest, bound.at - 1);
            bound.probe = Some(probe);
            return Some(trying(probe, bound));
        }
        Some(Verdict::Bound(bound.at, bound.message.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn config() -> QuotaAware {
        serde_json::from_value(serde_json::json!({
            "settleTime": "10s", "measureWindow": "20s", "relearnAfter": "10m"
        }))
        .unwrap()
    }

    /// Runs `count` workers from `start` for 40 s, polling every 5 s, at the given figures.
    fn run(ledger: &mut Ledger, count: i32, start: i64, throughput: f64, share: f64) -> i64 {
        let c = config();
        for t in (start..start + 40).step_by(5) {
            ledger.observe(&c, count, at(t), Some(throughput), Some(share));
        }
        start + 40
    }

    fn verdict(ledger: &mut Ledger, current: i32, share: f64, t: i64) -> String {
        match ledger.judge(&config(), current, Some(share), 1, at(t)) {
            Verdict::Proceed => "proceed".to_owned(),
            Verdict::Measuring(_) => "measuring".to_owned(),
            Verdict::Bound(count, _) => format!("hold {count}"),
        }
    }

    #[test]
    fn verdicts_follow_the_measured_effect_of_the_last_scale_out() {
        struct Case {
            name: &'static str,
            // (count, records/s, throttled share) in the order they ran
            steps: &'static [(i32, f64, f64)],
            want: &'static str,
        }
        let cases = [
            Case {
                name: "throttled but nothing measured before: proceed",
                steps: &[(2, 100.0, 0.3)],
                want: "proceed",
            },
            Case {
                name: "the scale-out doubled throughput",
                steps: &[(1, 100.0, 0.0), (2, 200.0, 0.1)],
                want: "proceed",
            },
            Case {
                name: "no gain and throttling rose: back to the count before",
                steps: &[(2, 200.0, 0.0), (4, 205.0, 0.4)],
                want: "hold 2",
            },
            Case {
                name: "no gain and no throttling (the source is the limit): proceed",
                steps: &[(2, 200.0, 0.0), (4, 205.0, 0.0)],
                want: "proceed",
            },
            Case {
                name: "throttling below the share that counts: proceed",
                steps: &[(2, 200.0, 0.0), (4, 205.0, 0.03)],
                want: "proceed",
            },
            Case {
                name: "throttled at both and no gain: half the calls got through at 2, so 1 is tried",
                steps: &[(2, 200.0, 0.5), (4, 205.0, 0.5)],
                want: "hold 1",
            },
            Case {
                name: "the fewest measured that reached the same rate, not just the last",
                steps: &[(3, 300.0, 0.0), (5, 310.0, 0.01), (8, 305.0, 0.5)],
                want: "hold 3",
            },
            Case {
                name: "a gain below minGainPercent with throttling counts as none",
                steps: &[(3, 300.0, 0.0), (6, 320.0, 0.3)],
                want: "hold 3",
            },
            Case {
                name: "throttled at the fewest measured too: one fewer is tried",
                steps: &[(4, 300.0, 0.1), (6, 305.0, 0.4)],
                want: "hold 3",
            },
            Case {
                name: "heavily throttled: the count the share that got through points to",
                steps: &[(6, 300.0, 0.5), (8, 300.0, 0.6)],
                want: "hold 3",
            },
        ];
        for case in cases {
            let mut ledger = Ledger::default();
            let mut t = 0;
            for (count, throughput, share) in case.steps {
                t = run(&mut ledger, *count, t, *throughput, *share);
            }
            let (current, _, share) = *case.steps.last().unwrap();
            assert_eq!(
                verdict(&mut ledger, current, share, t),
                case.want,
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn a_throttled_scale_out_waits_for_its_measurement_and_the_bound_carries_the_figures() {
        let c = config();
        let mut ledger = Ledger::default();
        let t = run(&mut ledger, 3, 0, 300.0, 0.0);
        // Unthrottled: more workers at once, nothing to measure first.
        assert_eq!(verdict(&mut ledger, 3, 0.0, t), "proceed");
        // Just scaled to 6 and throttled: not measured until settle + window (30 s) passed.
        ledger.observe(&c, 6, at(t), Some(300.0), Some(0.2));
        let Verdict::Measuring(why) = ledger.judge(&c, 6, Some(0.2), 1, at(t)) else {
            panic!("not measuring")
        };
        assert!(
            why.contains("20 % of embedding calls are throttled"),
            "{why}"
        );
        ledger.observe(&c, 6, at(t + 29), Some(300.0), Some(0.2));
        assert_eq!(verdict(&mut ledger, 6, 0.2, t + 29), "measuring");
        ledger.observe(&c, 6, at(t + 30), Some(301.0), Some(0.4));
        let Verdict::Bound(3, message) = ledger.judge(&c, 6, Some(0.4), 1, at(t + 30)) else {
            panic!("no bound at 3")
        };
        for figure in [
            "6 workers process 301.0 records/s with 40 %",
            "3 workers processed 300.0 records/s with 0 %",
            "holding 3 workers",
            "10m",
        ] {
            assert!(message.contains(figure), "{figure}: {message}");
        }
        // Back at 3, unthrottled: an alarm is held there; more throughput than learned lifts it.
        ledger.observe(&c, 3, at(t + 35), Some(300.0), Some(0.0));
        assert_eq!(verdict(&mut ledger, 3, 0.0, t + 36), "hold 3");
        let later = t + 35 + 30;
        ledger.observe(&c, 3, at(later), Some(400.0), Some(0.0));
        assert_eq!(ledger.bound(), None, "a raised quota lifts the bound");
    }

    #[test]
    fn a_bound_still_throttled_tries_fewer_workers_until_throughput_falls() {
        let c = config();
        let mut ledger = Ledger::default();
        let t = run(&mut ledger, 4, 0, 300.0, 0.2);
        let t = run(&mut ledger, 5, t, 300.0, 0.4);
        assert_eq!(
            verdict(&mut ledger, 5, 0.4, t),
            "hold 3",
            "4 is throttled: 3 is tried"
        );
        // 3 does as much, unthrottled: held there.
        let t = run(&mut ledger, 3, t, 298.0, 0.0);
        assert_eq!(verdict(&mut ledger, 3, 0.0, t), "hold 3");
        assert!(
            ledger
                .bound()
                .unwrap()
                .message
                .contains("3 workers reach it too")
        );

        // Still throttled at 3 but 2 fall short: back to 3, and no more tries.
        let mut ledger = Ledger::default();
        let t = run(&mut ledger, 3, 0, 300.0, 0.1);
        let t = run(&mut ledger, 5, t, 300.0, 0.4);
        assert_eq!(verdict(&mut ledger, 5, 0.4, t), "hold 2");
        let t = run(&mut ledger, 2, t, 200.0, 0.0);
        assert_eq!(verdict(&mut ledger, 2, 0.0, t), "hold 3");
        let t = run(&mut ledger, 3, t, 300.0, 0.1);
        assert_eq!(verdict(&mut ledger, 3, 0.1, t), "hold 3");
        assert!(ledger.bound().unwrap().message.contains("3 is the fewest"));
        // Never below the policy's floor.
        let mut ledger = Ledger::default();
        let t = run(&mut ledger, 3, 0, 300.0, 0.1);
        let t = run(&mut ledger, 5, t, 300.0, 0.4);
        assert!(matches!(
            ledger.judge(&c, 5, Some(0.4), 3, at(t)),
            Verdict::Bound(3, _)
        ));
        let t = run(&mut ledger, 3, t, 300.0, 0.1);
        assert!(matches!(
            ledger.judge(&c, 3, Some(0.1), 3, at(t)),
            Verdict::Bound(3, _)
        ));
    }

    #[test]
    fn a_bound_expires_after_relearn_after() {
        let c = config();
        let mut ledger = Ledger::default();
        let t = run(&mut ledger, 2, 0, 200.0, 0.0);
        let t = run(&mut ledger, 4, t, 200.0, 0.5);
        assert_eq!(verdict(&mut ledger, 4, 0.5, t), "hold 2");
        ledger.observe(&c, 2, at(t + 5), Some(200.0), Some(0.2));
        assert_eq!(verdict(&mut ledger, 2, 0.2, t + 100), "hold 2");
        ledger.observe(&c, 2, at(t + 600), Some(200.0), Some(0.2));
        assert_eq!(ledger.bound(), None);
        // The old measurements expired too: the next scale-out is tried and measured afresh.
        assert_eq!(verdict(&mut ledger, 2, 0.2, t + 600), "proceed");
    }
}
