//! Compiles `berth/v1/*.proto` into Rust with tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=berth/v1/berth.proto");
    tonic_prost_build::configure()
        // The agent RPC is called `Connect`, which clashes with the generated `connect`
        // constructor; clients are built from a `Channel` instead.
        .build_transport(false)
        .compile_protos(&["berth/v1/berth.proto"], &["."])?;
    Ok(())
}
