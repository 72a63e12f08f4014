//! The job state machine: states, kinds, and the transitions between states as pure functions.
//!
//! ```text
//!  new job ──▶ Pending (no dependency, or it succeeded) · Blocked (it is unfinished) ·
//!              Failed / Cancelled (it failed / was cancelled, or the sweep is cancelled)
//!
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
//! `attempts` counts attempts that ended without success (failed or expired). Every state a job
//! takes is decided here: [`JobStatus::initial`] for a new job, [`transition`] for each
//! [`Trigger`], and [`heartbeat`] for what a worker holding a lease is told. The stores read the
//! rows, call these inside their transactions, and write the result; their SQL decides nothing.

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
    /// Every kind.
    pub const ALL: [JobKind; 3] = [JobKind::Score, JobKind::Baseline, JobKind::Cell];

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
        JobKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| ParseNameError { what: "job kind", value: s.to_string() })
    }
}

/// Whether a sweep's jobs may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SweepState {
    /// Its runnable jobs are leased.
    #[default]
    Active,
    /// Cancelled: its unfinished jobs were cancelled, and jobs added to it start cancelled.
    Cancelled,
}

impl SweepState {
    /// Every state.
    pub const ALL: [SweepState; 2] = [SweepState::Active, SweepState::Cancelled];

    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            SweepState::Active => "active",
            SweepState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for SweepState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SweepState {
    type Err = ParseNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SweepState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| ParseNameError { what: "sweep state", value: s.to_string() })
    }
}

/// Something that happens to a job: the input of [`transition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The job it depends on succeeded.
    DependencySucceeded,
    /// The job it depends on failed for good.
    DependencyFailed,
    /// A worker leased it.
    Lease,
    /// The worker reported success.
    Complete,
    /// The worker reported success under the job's last lease after that lease expired and the
    /// job went back to the queue, before anyone leased it again (the worker finished while the
    /// coordinator was down, or its heartbeats did not get through): the work is done, so it is
    /// accepted and the attempt the expiry charged is given back.
    CompleteAfterExpiry,
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

impl Trigger {
    /// The error label this trigger leaves on the job, for the triggers whose error the
    /// coordinator writes (a worker's failure carries the worker's own label).
    pub fn error_kind(self) -> Option<&'static str> {
        match self {
            Trigger::LeaseExpired => Some("lease_expired"),
            Trigger::DependencyFailed => Some("dependency"),
            _ => None,
        }
    }
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

impl JobStatus {
    /// A new job's status. `dependency` is the state of the job it waits for (if any): a job
    /// starts where its dependency's outcome would have taken it, and cancelled in a cancelled
    /// sweep.
    pub fn initial(max_attempts: u32, dependency: Option<JobState>, sweep: SweepState) -> JobStatus {
        use JobState as S;
        let state = match (sweep, dependency) {
            (SweepState::Cancelled, _) => S::Cancelled,
            (SweepState::Active, None | Some(S::Succeeded)) => S::Pending,
            (SweepState::Active, Some(S::Failed)) => S::Failed,
            (SweepState::Active, Some(S::Cancelled)) => S::Cancelled,
            (SweepState::Active, Some(S::Blocked | S::Pending | S::Leased)) => S::Blocked,
        };
        JobStatus { state, attempts: 0, max_attempts }
    }
}

/// A trigger that is not allowed in the job's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {state} job cannot take {trigger:?}")]
pub struct InvalidTransition {
    /// The job's state.
    pub state: JobState,
    /// The refused trigger.
    pub trigger: Trigger,
}

/// Apply `trigger` to a job. Pure: the stores persist the result.
pub fn transition(status: JobStatus, trigger: Trigger) -> Result<JobStatus, InvalidTransition> {
    use JobState as S;
    use Trigger as T;
    let to = |state, attempts| Ok(JobStatus { state, attempts, ..status });
    let refuse = Err(InvalidTransition { state: status.state, trigger });
    match (status.state, trigger) {
        (S::Blocked, T::DependencySucceeded) => to(S::Pending, status.attempts),
        (S::Blocked, T::DependencyFailed) => to(S::Failed, status.attempts),
        (S::Pending, T::Lease) => to(S::Leased, status.attempts),
        (S::Leased, T::Complete) => to(S::Succeeded, status.attempts),
        (S::Pending, T::CompleteAfterExpiry) => to(S::Succeeded, status.attempts.saturating_sub(1)),
        (S::Leased, T::Fail { retryable: false }) => to(S::Failed, status.attempts + 1),
        (S::Leased, T::Fail { retryable: true } | T::LeaseExpired) => {
            let attempts = status.attempts + 1;
            to(if attempts >= status.max_attempts { S::Failed } else { S::Pending }, attempts)
        }
        (S::Blocked | S::Pending | S::Leased, T::Cancel) => to(S::Cancelled, status.attempts),
        (S::Failed | S::Cancelled, T::Retry { dependency_done }) => {
            to(if dependency_done { S::Pending } else { S::Blocked }, 0)
        }
        _ => refuse,
    }
}

/// What a heartbeat tells the worker that sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatVerdict {
    /// The job is still the worker's: its lease is renewed.
    Renew,
    /// The job was cancelled while this worker held it: stop and drop it.
    Cancelled,
    /// The lease is not the job's current one (it expired and the job was reclaimed or leased
    /// again, or the job finished): stop.
    Lost,
}

/// The verdict on a heartbeat for a job in `state`. `lease_is_current` says whether the lease
/// the worker presented is the last one the job was given. A heartbeat changes no state.
pub fn heartbeat(state: JobState, lease_is_current: bool) -> HeartbeatVerdict {
    match (state, lease_is_current) {
        (JobState::Leased, true) => HeartbeatVerdict::Renew,
        (JobState::Cancelled, true) => HeartbeatVerdict::Cancelled,
        _ => HeartbeatVerdict::Lost,
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
        let s = transition(status(JobState::Blocked, 0), Trigger::DependencySucceeded).unwrap();
        let s = transition(s, Trigger::Lease).unwrap();
        let s = transition(s, Trigger::Complete).unwrap();
        assert_eq!(s, status(JobState::Succeeded, 0));
    }

    #[test]
    fn expiry_requeues_until_max_attempts() {
        let mut s = status(JobState::Pending, 0);
        for attempt in 1..=3 {
            s = transition(s, Trigger::Lease).unwrap();
            s = transition(s, Trigger::LeaseExpired).unwrap();
            assert_eq!(s.attempts, attempt);
            let want = if attempt < 3 { JobState::Pending } else { JobState::Failed };
            assert_eq!(s.state, want);
        }
    }

    #[test]
    fn a_completion_after_expiry_succeeds_and_gives_the_attempt_back() {
        let s = transition(status(JobState::Leased, 0), Trigger::LeaseExpired).unwrap();
        assert_eq!(s, status(JobState::Pending, 1));
        let s = transition(s, Trigger::CompleteAfterExpiry).unwrap();
        assert_eq!(s, status(JobState::Succeeded, 0));
        // Only a job still waiting: once leased again (or finished) the old lease is stale.
        for state in [JobState::Leased, JobState::Failed, JobState::Cancelled, JobState::Succeeded] {
            assert!(transition(status(state, 1), Trigger::CompleteAfterExpiry).is_err(), "{state:?}");
        }
    }

    #[test]
    fn non_retryable_failure_is_final() {
        let s = transition(status(JobState::Leased, 0), Trigger::Fail { retryable: false }).unwrap();
        assert_eq!(s, status(JobState::Failed, 1));
        let s = transition(status(JobState::Leased, 0), Trigger::Fail { retryable: true }).unwrap();
        assert_eq!(s, status(JobState::Pending, 1));
    }

    #[test]
    fn cancel_and_retry() {
        for st in [JobState::Blocked, JobState::Pending, JobState::Leased] {
            assert_eq!(transition(status(st, 1), Trigger::Cancel).unwrap().state, JobState::Cancelled);
        }
        assert!(transition(status(JobState::Succeeded, 0), Trigger::Cancel).is_err());
        let r = transition(status(JobState::Failed, 3), Trigger::Retry { dependency_done: true }).unwrap();
        assert_eq!(r, status(JobState::Pending, 0));
        let r = transition(status(JobState::Cancelled, 1), Trigger::Retry { dependency_done: false }).unwrap();
        assert_eq!(r, status(JobState::Blocked, 0));
        assert!(transition(status(JobState::Succeeded, 0), Trigger::Retry { dependency_done: true }).is_err());
    }

    #[test]
    fn dependency_failure_fails_blocked_jobs() {
        let s = transition(status(JobState::Blocked, 0), Trigger::DependencyFailed).unwrap();
        assert_eq!(s.state, JobState::Failed);
    }

    #[test]
    fn stale_events_are_refused() {
        assert!(transition(status(JobState::Pending, 0), Trigger::Complete).is_err());
        assert!(transition(status(JobState::Succeeded, 0), Trigger::LeaseExpired).is_err());
        assert!(transition(status(JobState::Blocked, 0), Trigger::Lease).is_err());
    }

    #[test]
    fn only_pending_jobs_can_be_leased() {
        assert_eq!(transition(status(JobState::Pending, 2), Trigger::Lease).unwrap(), status(JobState::Leased, 2));
        for st in JobState::ALL.into_iter().filter(|s| *s != JobState::Pending) {
            let refused = transition(status(st, 0), Trigger::Lease).unwrap_err();
            assert_eq!(refused, InvalidTransition { state: st, trigger: Trigger::Lease });
        }
    }

    #[test]
    fn cancel_ends_every_unfinished_job_and_no_finished_one() {
        for st in JobState::ALL {
            let cancelled = transition(status(st, 1), Trigger::Cancel);
            if st.is_terminal() {
                assert!(cancelled.is_err(), "{st} cannot be cancelled");
            } else {
                assert_eq!(cancelled.unwrap(), status(JobState::Cancelled, 1), "{st} keeps its attempts");
            }
        }
    }

    #[test]
    fn a_cancelled_job_cannot_be_completed_or_unblocked() {
        let cancelled = status(JobState::Cancelled, 0);
        for trigger in [Trigger::Complete, Trigger::DependencySucceeded, Trigger::DependencyFailed, Trigger::Lease] {
            assert!(transition(cancelled, trigger).is_err(), "{trigger:?}");
        }
    }

    #[test]
    fn a_new_job_follows_its_dependency() {
        let initial = |dep| JobStatus::initial(3, dep, SweepState::Active).state;
        assert_eq!(initial(None), JobState::Pending);
        assert_eq!(initial(Some(JobState::Succeeded)), JobState::Pending);
        for unfinished in [JobState::Blocked, JobState::Pending, JobState::Leased] {
            assert_eq!(initial(Some(unfinished)), JobState::Blocked);
        }
        assert_eq!(initial(Some(JobState::Failed)), JobState::Failed);
        assert_eq!(initial(Some(JobState::Cancelled)), JobState::Cancelled);
        assert_eq!(JobStatus::initial(3, None, SweepState::Active), status(JobState::Pending, 0));
    }

    #[test]
    fn a_new_job_in_a_cancelled_sweep_starts_cancelled() {
        for dep in [None, Some(JobState::Succeeded), Some(JobState::Blocked), Some(JobState::Failed)] {
            assert_eq!(JobStatus::initial(3, dep, SweepState::Cancelled).state, JobState::Cancelled);
        }
    }

    #[test]
    fn heartbeat_renews_only_the_current_lease_of_a_leased_job() {
        assert_eq!(heartbeat(JobState::Leased, true), HeartbeatVerdict::Renew);
        assert_eq!(heartbeat(JobState::Leased, false), HeartbeatVerdict::Lost, "re-leased to another worker");
        assert_eq!(heartbeat(JobState::Cancelled, true), HeartbeatVerdict::Cancelled);
        assert_eq!(heartbeat(JobState::Cancelled, false), HeartbeatVerdict::Lost, "cancelled under a later lease");
        for st in [JobState::Pending, JobState::Succeeded, JobState::Failed, JobState::Blocked] {
            assert_eq!(heartbeat(st, true), HeartbeatVerdict::Lost, "{st}");
        }
    }

    #[test]
    fn coordinator_made_failures_carry_their_label() {
        assert_eq!(Trigger::LeaseExpired.error_kind(), Some("lease_expired"));
        assert_eq!(Trigger::DependencyFailed.error_kind(), Some("dependency"));
        assert_eq!(Trigger::Fail { retryable: true }.error_kind(), None, "the worker labels its own failures");
    }

    #[test]
    fn names_round_trip() {
        for st in JobState::ALL {
            assert_eq!(st.to_string().parse::<JobState>().unwrap(), st);
        }
        for k in JobKind::ALL {
            assert_eq!(k.to_string().parse::<JobKind>().unwrap(), k);
        }
        for st in SweepState::ALL {
            assert_eq!(st.to_string().parse::<SweepState>().unwrap(), st);
        }
        assert!("running".parse::<JobState>().is_err());
        assert!("paused".parse::<SweepState>().is_err());
    }
}
