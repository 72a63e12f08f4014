//! Records the git commit the worker is built from (`PRUNESWEEP_GIT_COMMIT`, with `-dirty` when the
//! tree has uncommitted changes to tracked files; `unknown` outside a git checkout), for the
//! provenance every result carries (`src/provenance.rs`).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).filter(|c| !c.is_empty());
    let value = match commit {
        Some(c) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{c}-dirty")
            } else {
                c
            }
        }
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=PRUNESWEEP_GIT_COMMIT={value}");
    // Run again when the commit moves, the index changes, or any source does (the dirty flag).
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={git_dir}/HEAD");
        println!("cargo:rerun-if-changed={git_dir}/index");
        println!("cargo:rerun-if-changed={git_dir}/refs");
    }
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=../proto");
    println!("cargo:rerun-if-changed=../coordinator/src");
}
