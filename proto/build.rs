//! Compiles `prunesweep/v1/prunesweep.proto` with protox (pure Rust; no system `protoc`) and
//! generates the prost messages and tonic client + server into `OUT_DIR`.
//!
//! The enums that sweep files and stored job specs name (prune method, eval task, adapter
//! targets, schedule, dtype) also get serde, by their kebab-case names (`block-influence`, `c4-loss`):
//! the same names [`vocabulary`](src/vocabulary.rs) derives, which a test holds them to.

/// Enums written by name in sweep files and stored specs.
const NAMED_ENUMS: [&str; 5] = ["PruneMethod", "EvalTaskKind", "AdapterTargets", "LrSchedule", "Dtype"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=prunesweep/v1");
    let fds = protox::compile(["prunesweep/v1/prunesweep.proto"], ["."])?;
    let mut config = tonic_prost_build::configure().build_client(true).build_server(true);
    for name in NAMED_ENUMS {
        config = config.enum_attribute(
            format!("prunesweep.v1.{name}"),
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(rename_all = \"kebab-case\")]",
        );
    }
    config.compile_fds(fds)?;
    Ok(())
}
