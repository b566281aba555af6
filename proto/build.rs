//! Generates the gRPC code for `faultline.v1` with a vendored protoc, so no
//! system protoc is needed, and writes the file descriptor set that the
//! server's reflection service publishes.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "faultline/v1/faultline.proto";
    println!("cargo:rerun-if-changed={proto}");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = tonic_prost_build::Config::new();
    config
        .protoc_executable(protoc_bin_vendored::protoc_bin_path()?)
        // Page data is decoded as `Bytes`: a slice of the receive buffer, no copy.
        .bytes(["."])
        .file_descriptor_set_path(out_dir.join("faultline_descriptor.bin"));
    tonic_prost_build::configure().compile_with_config(config, &[proto], &["."])?;
    Ok(())
}
