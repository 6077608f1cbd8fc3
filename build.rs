//! Compiles the wire protocol with prost. Byte fields become `bytes::Bytes` so a decoded
//! request borrows the connection's read buffer instead of copying every key and value.
fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/flux.proto");
    println!("cargo:rerun-if-changed=proto/cdc.proto");
    prost_build::Config::new()
        .bytes(["."])
        .compile_protos(&["proto/flux.proto", "proto/cdc.proto"], &["proto/"])
}
