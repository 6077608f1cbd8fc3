//! Fuzz target: see `flux_kv::fuzz::snapshot`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flux_kv::fuzz::snapshot(data));
