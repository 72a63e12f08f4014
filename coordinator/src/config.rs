//! The coordinator's timing and limits: lease length, heartbeat and reaper intervals, long-poll
//! limits, the jobs one submit may plan. Read by the server (reaper) and the services (lease,
//! register, watch, submit); set by `main` from its flags.

use std::time::Duration;

/// Lease timing, polling limits and the submit cap.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a lease lasts without a heartbeat.
    pub lease_ttl: Duration,
    /// How often workers should heartbeat (told to them at registration).
    pub heartbeat_interval: Duration,
    /// How often the reaper looks for expired leases.
    pub reap_interval: Duration,
    /// How long after a start the reaper waits before its first look: a coordinator coming back
    /// from an outage lets live workers heartbeat their leases first, so that its own downtime
    /// does not expire them (and charge their jobs an attempt).
    pub startup_grace: Duration,
    /// The longest a `LeaseJob` long-poll waits.
    pub max_wait: Duration,
    /// How often `WatchSweep` polls the event log.
    pub watch_poll: Duration,
    /// The most jobs one `SubmitSweep` may plan, counted before any is built
    /// (`coordinator serve --max-jobs-per-submit`).
    pub max_jobs_per_submit: u64,
}

impl Config {
    /// The timing for leases of `lease_ttl`: workers heartbeat four times per lease, and the
    /// reaper looks as often, at least every 5 s, so an expired lease is found within ~¼ of its
    /// length; after a start it first waits one lease length (every live worker heartbeats in it).
    pub fn for_lease_ttl(lease_ttl: Duration) -> Self {
        let lease_ttl = lease_ttl.max(Duration::from_secs(1));
        Config {
            lease_ttl,
            heartbeat_interval: lease_ttl / 4,
            reap_interval: (lease_ttl / 4).min(Duration::from_secs(5)),
            startup_grace: lease_ttl,
            ..Config::default()
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(15),
            reap_interval: Duration::from_secs(5),
            startup_grace: Duration::from_secs(60),
            max_wait: Duration::from_secs(30),
            watch_poll: Duration::from_millis(500),
            max_jobs_per_submit: crate::sweep::DEFAULT_MAX_JOBS_PER_SUBMIT,
        }
    }
}
