//! The report of a dead-letter redrive: what `vectorpipe-worker redrive` prints with `--json` and
//! writes to a Job's termination message, and what `kubectl vectorpipe redrive` reads back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a redrive did, by count.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Report {
    /// The redrive's id (in each record's `vectorpipe.redrive` header).
    pub id: String,
    /// Dead letters read.
    pub read: u64,
    /// Of them, the ones the selection took.
    pub selected: u64,
    /// Records to write back, once the ones below are left out.
    pub chosen: u64,
    /// Records written back to their source topic (0 in a dry run).
    pub redriven: u64,
    /// Selected, by reason.
    pub by_reason: BTreeMap<String, u64>,
    /// Not redriven: a newer version or a tombstone of the record id came later.
    pub superseded: u64,
    /// Not redriven: the same source record was selected more than once.
    pub duplicates: u64,
    /// Not redriven: the value was cut to fit the dead-letter topic.
    pub truncated: u64,
    /// Not redriven: from a topic this pipeline does not read.
    pub other_topic: u64,
    /// Not redriven: no `vectorpipe.*` headers (not written by a vectorpipe worker).
    pub unreadable: u64,
    /// Not redriven: over the limit.
    pub over_limit: u64,
    /// True when nothing was written.
    pub dry_run: bool,
}

impl Report {
    /// The report for people, a line each.
    pub fn lines(&self) -> Vec<String> {
        let (verb, n) = if self.dry_run {
            ("would redrive", self.chosen)
        } else {
            ("redriven", self.redriven)
        };
        let mut lines = vec![format!(
            "{}: {verb} {n} of {} dead letters read ({} selected)",
            self.id, self.read, self.selected
        )];
        for (reason, n) in &self.by_reason {
            lines.push(format!("  selected {reason}: {n}"));
        }
        for (n, why) in [
            (
                self.superseded,
                "a newer version or a tombstone of the record came later",
            ),
            (
                self.duplicates,
                "the same record was dead-lettered more than once",
            ),
            (
                self.truncated,
                "the value was cut to fit the dead-letter topic",
            ),
            (self.other_topic, "from a topic this pipeline does not read"),
            (
                self.unreadable,
                "not written by a vectorpipe worker (no vectorpipe.reason header)",
            ),
            (self.over_limit, "over --limit"),
        ] {
            if n > 0 {
                lines.push(format!("  not redriven, {why}: {n}"));
            }
        }
        lines
    }
}
