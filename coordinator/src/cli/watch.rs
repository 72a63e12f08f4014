//! `coordinator status SWEEP --watch` (and `coordinator run`): a progress bar that follows the
//! sweep's events until it is done, through coordinator restarts.
//!
//! A coordinator that shuts down ends every watch with UNAVAILABLE, one that is down refuses the
//! connection with the same code, and one that was killed breaks the stream. Events commit in
//! sequence order, so the watch asks again from the last sequence number it received and misses
//! none; it gives up after [`RECONNECT_FOR`] without a coordinator.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use prunesweep_coordinator::web::view::Counts;
use prunesweep_proto::v1 as pb;
use tonic::Code;

use crate::Client;

/// How long a watch keeps asking a coordinator that is unavailable (a restart, a rolling update)
/// before it fails.
pub(crate) const RECONNECT_FOR: Duration = Duration::from_secs(600);

/// The pause before the first attempt after the coordinator went away; it doubles each time.
const FIRST_PAUSE: Duration = Duration::from_secs(1);

/// The longest pause between two attempts.
const MAX_PAUSE: Duration = Duration::from_secs(15);

/// Follows `sweep` with a progress bar until it is done; failed jobs are printed as they fail.
pub(crate) async fn watch(client: &mut Client, sweep: &str) -> Result<()> {
    let status = client.get_sweep(pb::GetSweepRequest { sweep: sweep.to_string() }).await?.into_inner();
    let mut last = Counts::from_pb(&status);
    let bar = ProgressBar::new(u64::from(last.total()));
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} jobs {msg}").expect("the template is valid"));
    show(&bar, &last);
    // `bar.println` prints nothing where the bar is hidden (stderr not a terminal: a Slurm log, a
    // pipe); these lines must show there too.
    let say = |line: String| bar.suspend(|| eprintln!("{line}"));
    let mut after = 0;
    let mut down_since: Option<Instant> = None;
    let mut pause = FIRST_PAUSE;
    loop {
        let followed = async {
            let mut stream = client
                .watch_sweep(pb::WatchSweepRequest { sweep: sweep.to_string(), after_seq: after })
                .await?
                .into_inner();
            if down_since.take().is_some() {
                pause = FIRST_PAUSE;
                say(format!("the coordinator is back; following {sweep} from event {after}"));
            }
            while let Some(event) = stream.message().await? {
                after = event.seq;
                if let Some(s) = &event.status {
                    last = Counts::from_pb(s);
                    show(&bar, &last);
                }
                if event.state() == pb::JobState::Failed {
                    say(format!("job {} failed: {}", event.job_id, event.message.unwrap_or_default()));
                }
            }
            Ok::<_, tonic::Status>(())
        }
        .await;
        match followed {
            Ok(()) => break,
            Err(s) if coordinator_gone(&s) => {
                let since = *down_since.get_or_insert_with(|| {
                    say(format!("the coordinator is unavailable ({}); trying again", s.message()));
                    Instant::now()
                });
                if since.elapsed() >= RECONNECT_FOR {
                    bail!(
                        "the coordinator has been unavailable for {} s ({}); the sweep goes on without this \
                         watch: `coordinator status {sweep} --watch` follows it again",
                        since.elapsed().as_secs(),
                        s.message()
                    );
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
            Err(s) => return Err(s.into()),
        }
    }
    bar.finish();
    // The outcome in words, where the bar is hidden too.
    eprintln!(
        "{sweep}: {} of {} jobs finished (succeeded {}, failed {}, cancelled {})",
        last.done(),
        last.total(),
        last.succeeded,
        last.failed,
        last.cancelled
    );
    Ok(())
}

/// Whether `status` says the coordinator went away rather than refused the watch: UNAVAILABLE
/// (shutting down, or the connection refused), or a status this client made from a broken
/// connection (a killed coordinator's stream ends in a transport error, which tonic reports as
/// UNKNOWN or INTERNAL with that error as its source; a coordinator's own statuses have none).
fn coordinator_gone(status: &tonic::Status) -> bool {
    use std::error::Error;
    status.code() == Code::Unavailable
        || (matches!(status.code(), Code::Unknown | Code::Internal | Code::Cancelled) && status.source().is_some())
}

/// The bar at `c`: finished jobs of all, and the count in each state.
fn show(bar: &ProgressBar, c: &Counts) {
    bar.set_length(u64::from(c.total()));
    bar.set_position(u64::from(c.done()));
    bar.set_message(format!(
        "blocked {} pending {} leased {} succeeded {} failed {} cancelled {}",
        c.blocked, c.pending, c.leased, c.succeeded, c.failed, c.cancelled
    ));
}
