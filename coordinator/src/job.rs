//! The job state machine: states, kinds, and the transitions between states as pure functions.
//!
//! ```text
//!            dependency succeeded
//!  Blocked ─────────────────────────▶ Pending ◀──────────────┐ lease expired / retryable failure
//!     │  dependency failed              │ lease                │ (attempts + 1 < max_attempts)
//!     ▼                                 ▼                      │
//!  Failed ◀── non-retryable, or ──── Leased ──────────────────┘
//!             attempts reach max        │ complete
//!                                       ▼
//!                                   Succeeded
//!  any non-terminal state ── cancel ──▶ Cancelled
//!  Failed / Cancelled ── retry ──▶ Pending (or Blocked behind an unfinished dependency), attempts = 0
//! ```
//!
//! `attempts` counts attempts that ended without success (failed or expired). The stores apply
//! these transitions inside their transactions; the SQL only selects rows and writes the result.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Score the model's layers on calibration data (once per model × calibration).
    Score,
    /// Evaluate the unpruned model (once per model).
    Baseline,
    /// Prune, heal, evaluate: one point of the sweep.
    Cell,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Waiting for its dependency (the score job).
    Blocked,
    /// Runnable.
    Pending,
    /// Held by a worker under a lease.
    Leased,
    /// Done, with results.
    Succeeded,
    /// Failed for good.
    Failed,
    /// Cancelled with its sweep.
    Cancelled,
}

impl JobState {
    /// Every state, in display order.
    pub const ALL: [JobState; 6] = [
        JobState::Blocked,
        JobState::Pending,
        JobState::Leased,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// Succeeded, failed and cancelled jobs do not change without a retry.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Blocked => "blocked",
            JobState::Pending => "pending",
            JobState::Leased => "leased",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl JobKind {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Score => "score",
            JobKind::Baseline => "baseline",
            JobKind::Cell => "cell",
        }
    }
}

/// A state or kind name that is not one of ours (a corrupt row).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}")]
pub struct ParseNameError {
    what: &'static str,
    value: String,
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = ParseNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| ParseNameError { what: "job state", value: s.to_string() })
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobKind {
    type Err = ParseNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [JobKind::Score, JobKind::Baseline, JobKind::Cell]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| ParseNameError { what: "job kind", value: s.to_string() })
    }
}

/// Something that happens to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEvent {
    /// The job it depends on succeeded.
    DependencySucceeded,
    /// The job it depends on failed for good.
    DependencyFailed,
    /// A worker leased it.
    Lease,
    /// The worker reported success.
    Complete,
    /// The worker reported a failure.
    Fail {
        /// Whether another attempt may succeed.
        retryable: bool,
    },
    /// Its lease expired without a heartbeat.
    LeaseExpired,
    /// Its sweep was cancelled.
    Cancel,
    /// The user asked to retry it. `dependency_done` says whether its dependency (if any) succeeded.
    Retry {
        /// True when the job has no dependency or it succeeded.
        dependency_done: bool,
    },
}

/// A job's state and attempt count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobStatus {
    /// The state.
    pub state: JobState,
    /// Attempts that ended without success.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
}

/// An event that is not allowed in the job's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {state} job cannot take {event:?}")]
pub struct InvalidTransition {
    /// The job's state.
    pub state: JobState,
    /// The refused event.
    pub event: JobEvent,
}

/// Apply `event` to a job. Pure: the stores persist the result.
pub fn transition(status: JobStatus, event: JobEvent) -> Result<JobStatus, InvalidTransition> {
    use JobEvent as E;
    use JobState as S;
    let to = |state, attempts| Ok(JobStatus { state, attempts, ..status });
    let refuse = Err(InvalidTransition { state: status.state, event });
    match (status.state, event) {
        (S::Blocked, E::DependencySucceeded) => to(S::Pending, status.attempts),
        (S::Blocked, E::DependencyFailed) => to(S::Failed, status.attempts),
        (S::Pending, E::Lease) => to(S::Leased, status.attempts),
        (S::Leased, E::Complete) => to(S::Succeeded, status.attempts),
        (S::Leased, E::Fail { retryable: false }) => to(S::Failed, status.attempts + 1),
        (S::Leased, E::Fail { retryable: true } | E::LeaseExpired) => {
            let attempts = status.attempts + 1;
            to(if attempts >= status.max_attempts { S::Failed } else { S::Pending }, attempts)
        }
        (S::Blocked | S::Pending | S::Leased, E::Cancel) => to(S::Cancelled, status.attempts),
        (S::Failed | S::Cancelled, E::Retry { dependency_done }) => {
            to(if dependency_done { S::Pending } else { S::Blocked }, 0)
        }
        _ => refuse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: JobState, attempts: u32) -> JobStatus {
        JobStatus { state, attempts, max_attempts: 3 }
    }

    #[test]
    fn happy_path() {
        let s = transition(status(JobState::Blocked, 0), JobEvent::DependencySucceeded).unwrap();
        let s = transition(s, JobEvent::Lease).unwrap();
        let s = transition(s, JobEvent::Complete).unwrap();
        assert_eq!(s, status(JobState::Succeeded, 0));
    }

    #[test]
    fn expiry_requeues_until_max_attempts() {
        let mut s = status(JobState::Pending, 0);
        for attempt in 1..=3 {
            s = transition(s, JobEvent::Lease).unwrap();
            s = transition(s, JobEvent::LeaseExpired).unwrap();
            assert_eq!(s.attempts, attempt);
            let want = if attempt < 3 { JobState::Pending } else { JobState::Failed };
            assert_eq!(s.state, want);
        }
    }

    #[test]
    fn non_retryable_failure_is_final() {
        let s = transition(status(JobState::Leased, 0), JobEvent::Fail { retryable: false }).unwrap();
        assert_eq!(s, status(JobState::Failed, 1));
        let s = transition(status(JobState::Leased, 0), JobEvent::Fail { retryable: true }).unwrap();
        assert_eq!(s, status(JobState::Pending, 1));
    }

    #[test]
    fn cancel_and_retry() {
        for st in [JobState::Blocked, JobState::Pending, JobState::Leased] {
            assert_eq!(transition(status(st, 1), JobEvent::Cancel).unwrap().state, JobState::Cancelled);
        }
        assert!(transition(status(JobState::Succeeded, 0), JobEvent::Cancel).is_err());
        let r = transition(status(JobState::Failed, 3), JobEvent::Retry { dependency_done: true }).unwrap();
        assert_eq!(r, status(JobState::Pending, 0));
        let r = transition(status(JobState::Cancelled, 1), JobEvent::Retry { dependency_done: false }).unwrap();
        assert_eq!(r, status(JobState::Blocked, 0));
        assert!(transition(status(JobState::Succeeded, 0), JobEvent::Retry { dependency_done: true }).is_err());
    }

    #[test]
    fn dependency_failure_fails_blocked_jobs() {
        let s = transition(status(JobState::Blocked, 0), JobEvent::DependencyFailed).unwrap();
        assert_eq!(s.state, JobState::Failed);
    }

    #[test]
    fn stale_events_are_refused() {
        assert!(transition(status(JobState::Pending, 0), JobEvent::Complete).is_err());
        assert!(transition(status(JobState::Succeeded, 0), JobEvent::LeaseExpired).is_err());
        assert!(transition(status(JobState::Blocked, 0), JobEvent::Lease).is_err());
    }

    #[test]
    fn names_round_trip() {
        for st in JobState::ALL {
            assert_eq!(st.to_string().parse::<JobState>().unwrap(), st);
        }
        for k in [JobKind::Score, JobKind::Baseline, JobKind::Cell] {
            assert_eq!(k.to_string().parse::<JobKind>().unwrap(), k);
        }
        assert!("running".parse::<JobState>().is_err());
    }
}
