//! glibc's `malloc` settings `worker heal` and `worker serve` run with, and the re-run at start
//! that applies them (glibc reads its tunables, `GLIBC_TUNABLES`, only when a program starts).
//!
//! **`worker heal`** ([`HEAL_MALLOC_TUNABLES`]). By default glibc serves an allocation from fresh
//! pages once it is larger than a threshold that starts at 128 KiB, and hands the top of its heap
//! back to the kernel whenever more than twice that is free. A healing step allocates and frees
//! gigabytes of tensors of a few MiB each (the kept graphs, the products' outputs), so every step
//! faulted them in again and the kernel cleared every page: a quarter of a CPU healing step's time
//! was system time. With these tunables allocations up to 32 MiB (glibc's largest threshold) come
//! from a heap that is never handed back, and each step reuses the last one's memory; the peak is
//! the same.
//!
//! **`worker serve`** ([`SERVE_MALLOC_TUNABLES`]): one arena for every thread. A job's phases run
//! on one thread, but candle's kernels allocate on its pool's threads too, each with an arena of
//! its own by default, so the evaluation after healing could not reuse what healing freed in
//! another arena and grew past it: SmolLM2's heal cell (`tests/memory.rs`, each phase's peak
//! reported) healed at 476–479 MiB and then evaluated at 497–586 MiB, run to run. With one arena
//! it evaluated within what healing had held (479–481 MiB, four runs), and healing's speed was the
//! same (2 cores; `worker heal` with and without, alternated). Serve keeps glibc's thresholds: it
//! reads the host's free memory between jobs (what it offers the coordinator, whether a model fits,
//! how many graphs it keeps), where a kept heap would count as used, and it streams models that do
//! not fit block by block, where a heap that keeps the blocks' freed memory raised the peak by a
//! fifth (a random 6×1024 llama's streamed baseline: 501 MiB with glibc's defaults, 604–632 with
//! healing's tunables bounded to 1 GiB, 868 with a 1 GiB top pad).
//!
//! Other commands run with glibc's defaults. `PRUNESWEEP_MALLOC=default`, or any `GLIBC_TUNABLES`
//! of one's own, turns the re-run off.

use std::ffi::OsStr;
use std::path::Path;

/// `worker heal`'s `GLIBC_TUNABLES`: allocations up to 32 MiB from the heap, whose top is handed
/// back only beyond 16 GiB free.
pub const HEAL_MALLOC_TUNABLES: &str = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184";

/// `worker serve`'s `GLIBC_TUNABLES`: one arena shared by every thread.
pub const SERVE_MALLOC_TUNABLES: &str = "glibc.malloc.arena_max=1";

/// Set in the re-run's environment, so that it never re-runs again (glibc drops `GLIBC_TUNABLES`
/// for setuid programs and programs with file capabilities).
const RERUN_MARKER: &str = "PRUNESWEEP_MALLOC_RERUN";

/// Runs this binary again, in place (same process id, arguments, `argv[0]` and environment), with
/// `tunables` as `GLIBC_TUNABLES`, unless `GLIBC_TUNABLES` is already set (an operator's value wins),
/// `PRUNESWEEP_MALLOC=default`, this is the re-run, or the running program is not the binary
/// `argv[0]` names (started through the dynamic loader, or through a link of another name). Call it
/// first thing in `main`, before any thread starts. Returns when it does not re-run, or when the
/// re-run could not start (said on stderr; the program then runs with glibc's defaults).
pub fn run_with_malloc_tunables(tunables: &str) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        match std::env::var("PRUNESWEEP_MALLOC").as_deref() {
            Ok("default") => return,
            Ok("tuned") | Err(_) => {}
            Ok(other) => eprintln!("PRUNESWEEP_MALLOC={other}: expected `tuned` (the default) or `default`; tuning"),
        }
        if std::env::var_os("GLIBC_TUNABLES").is_some() || std::env::var_os(RERUN_MARKER).is_some() {
            return;
        }
        let mut args = std::env::args_os();
        let (Ok(exe), Some(argv0)) = (std::env::current_exe(), args.next()) else { return };
        if !names_binary(&argv0, &exe) {
            return;
        }
        let error = std::process::Command::new(&exe)
            .arg0(&argv0)
            .args(args)
            .env("GLIBC_TUNABLES", tunables)
            .env(RERUN_MARKER, "1")
            .exec();
        eprintln!("running with glibc's default malloc settings: re-running {} failed: {error}", exe.display());
    }
}

/// Whether `argv0` (a path, or a name looked up in `PATH`) names the executable `exe`.
fn names_binary(argv0: &OsStr, exe: &Path) -> bool {
    let named = Path::new(argv0);
    if named.components().count() > 1 {
        named.canonicalize().is_ok_and(|path| path == exe)
    } else {
        named.file_name() == exe.file_name()
    }
}

/// The process's malloc settings in words (`worker heal` records them in `prunesweep.json`,
/// `worker serve` logs them at start).
pub fn describe() -> String {
    match std::env::var("GLIBC_TUNABLES") {
        Ok(t) if [HEAL_MALLOC_TUNABLES, SERVE_MALLOC_TUNABLES].contains(&t.as_str()) => {
            format!("the worker's settings ({t})")
        }
        Ok(t) => format!("GLIBC_TUNABLES={t} (the environment's)"),
        Err(_) => "glibc's defaults".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv0_names_the_binary_by_path_or_by_name() {
        let exe = std::env::current_exe().unwrap();
        assert!(names_binary(exe.as_os_str(), &exe));
        assert!(names_binary(exe.file_name().unwrap(), &exe));
        // Started through the dynamic loader, /proc/self/exe is the loader.
        assert!(!names_binary(OsStr::new("worker"), Path::new("/lib64/ld-linux-x86-64.so.2")));
        assert!(!names_binary(OsStr::new("/no/such/dir/worker"), &exe));
    }
}
