//! Compiles proto/uplink/v1/*.proto with the protoc shipped in `protoc-bin-vendored`, so a
//! fresh machine needs no system protoc.

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
    prost_build::Config::new()
        .protoc_executable(protoc_bin_vendored::protoc_bin_path()?)
        .compile_protos(&protos, &[dir])?;
    Ok(())
}
