//! Compiles proto/uplink/v1/*.proto (messages and the Agent service) with the protoc
//! shipped in `protoc-bin-vendored`, so a fresh machine needs no system protoc.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from("proto");
    let mut protos: Vec<PathBuf> = std::fs::read_dir(dir.join("uplink/v1"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    protos.sort();
    println!("cargo:rerun-if-changed=proto/uplink/v1");
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // JSON/YAML output of uplinkctl: messages serialize, enums by name.
    let mut builder = tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("uplink_descriptor.bin"))
        .message_attribute(".uplink.v1", "#[derive(serde::Serialize)]");
    for (field, f) in [
        ("uplink.v1.Uplink.state", "uplink_state"),
        ("uplink.v1.Event.from_state", "uplink_state"),
        ("uplink.v1.Event.to_state", "uplink_state"),
        ("uplink.v1.Uplink.balance", "balance"),
        ("uplink.v1.Client.reason", "reason"),
    ] {
        builder = builder.field_attribute(
            field,
            format!("#[serde(serialize_with = \"crate::ser::{f}\")]"),
        );
    }
    builder.compile_with_config(config, &protos, &[dir])?;
    Ok(())
}
