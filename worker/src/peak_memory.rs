//! The process's peak resident memory over a stretch of work: `worker serve` reports it with each
//! phase of a job (`PhaseTiming.peak_host_bytes`), so that what the memory model predicted for the
//! job (`coordinator plan`) can be checked against what it took, job by job, on any Linux machine.
//!
//! The kernel keeps the peak (`VmHWM` in `/proc/self/status`); writing `5` to
//! `/proc/self/clear_refs` (Linux ≥ 4.0) sets it back to the current resident size, so a window's
//! peak is the memory held when it starts (the loaded model, what the allocator kept) plus what
//! the window added at most. Where the reset is refused, or there is no `/proc`, nothing is
//! reported: the process's lifetime peak would be a figure about earlier jobs. (After a reset,
//! `getrusage` and `/usr/bin/time`'s maximum resident size no longer give the process's lifetime
//! peak either.)

/// A window over which the process's peak resident memory is measured ([`PeakWindow::start`]).
/// One at a time: the peak is the process's, and starting a window resets it for every other.
#[derive(Debug)]
pub struct PeakWindow {
    /// Whether the kernel reset the peak when the window started.
    reset: bool,
}

impl PeakWindow {
    /// Starts a window: resets the process's peak resident memory to its current resident size.
    pub fn start() -> Self {
        PeakWindow { reset: std::fs::write("/proc/self/clear_refs", "5").is_ok() }
    }

    /// The peak resident memory since [`PeakWindow::start`], in bytes; `None` where it cannot be
    /// told (not Linux, or the reset was refused).
    pub fn peak_bytes(&self) -> Option<u64> {
        if self.reset {
            status_bytes("VmHWM:")
        } else {
            None
        }
    }
}

/// A `kB` field of `/proc/self/status` (`VmRSS:`, `VmHWM:`, ...) in bytes; `None` without `/proc`.
pub fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs this test binary's `#[ignore]`d test `name` alone in a child process, with `env` (a
/// process's peak is its own: other tests' threads would move it), and returns the figures it
/// printed as `key=value` words (a value that is not a number, such as `none`, is left out).
#[cfg(test)]
pub(crate) fn figures_from_child(name: &str, env: &[(&str, String)]) -> std::collections::HashMap<String, u64> {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--ignored", "--nocapture", "--test-threads=1"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{name} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Writes every page of `bytes` fresh bytes (so that they are resident), then frees them.
    fn touch(bytes: usize) {
        let mut v = vec![0u8; bytes];
        for i in (0..bytes).step_by(4096) {
            v[i] = 1;
        }
        std::hint::black_box(&v);
    }

    /// Run by [`a_window_sees_what_it_touched_and_not_what_came_before`] in a child process:
    /// prints the peaks it measures (`none` where the window has none).
    #[test]
    #[ignore = "a child process of a_window_sees_what_it_touched_and_not_what_came_before"]
    fn window_in_child() {
        touch(256 << 20);
        let lifetime = status_bytes("VmHWM:").unwrap();
        let window = PeakWindow::start();
        let start = window.peak_bytes();
        touch(64 << 20);
        let peak = window.peak_bytes();
        let resident = status_bytes("VmRSS:").unwrap();
        let shown = |v: Option<u64>| v.map_or("none".to_string(), |v| v.to_string());
        println!("lifetime={lifetime} start={} peak={} resident={resident}", shown(start), shown(peak));
    }

    #[test]
    fn a_window_sees_what_it_touched_and_not_what_came_before() {
        if status_bytes("VmRSS:").is_none() {
            eprintln!("no /proc/self/status: peak resident memory is measured on Linux only");
            return;
        }
        let figures = figures_from_child("peak_memory::tests::window_in_child", &[]);
        let (lifetime, resident) = (figures["lifetime"], figures["resident"]);
        let (Some(&start), Some(&peak)) = (figures.get("start"), figures.get("peak")) else {
            eprintln!("/proc/self/clear_refs refused here: no window peaks ({figures:?})");
            return;
        };
        // The 256 MiB freed before the window count in the process's peak, not the window's; the
        // 64 MiB freed inside it do.
        assert!(lifetime >= start + 200 * MIB, "{figures:?}");
        assert!(peak >= resident + 60 * MIB && peak < start + 100 * MIB, "{figures:?}");
    }
}
