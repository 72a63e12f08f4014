//! Compiles `prunesweep/v1/prunesweep.proto` with protox (pure Rust; no system `protoc`) and
//! generates the prost messages and tonic client + server into `OUT_DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=prunesweep/v1");
    let fds = protox::compile(["prunesweep/v1/prunesweep.proto"], ["."])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
