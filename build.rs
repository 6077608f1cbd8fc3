//! Compiles the wire protocol with prost. Byte fields become `bytes::Bytes` so a decoded
//! request borrows the connection's read buffer instead of copying every key and value.
//! The rare, large Stats sections are boxed so every `Response` stays small. The Stats
//! messages also derive `serde::Serialize`, for `flux-cli stats --json`.
fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/flux.proto");
    println!("cargo:rerun-if-changed=proto/cdc.proto");
    prost_build::Config::new()
        .bytes(["."])
        .boxed(".flux.v1.StatsResponse.cdc")
        .boxed(".flux.v1.StatsResponse.persistence")
        .type_attribute(".flux.v1.StatsResponse", "#[derive(serde::Serialize)]")
        .type_attribute(".flux.v1.CoreStats", "#[derive(serde::Serialize)]")
        .type_attribute(".flux.v1.CdcStats", "#[derive(serde::Serialize)]")
        .type_attribute(".flux.v1.PersistenceStats", "#[derive(serde::Serialize)]")
        .compile_protos(&["proto/flux.proto", "proto/cdc.proto"], &["proto/"])
}
