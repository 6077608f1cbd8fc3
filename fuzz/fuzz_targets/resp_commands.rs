//! Fuzz target: see `flux_kv::fuzz::resp_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flux_kv::fuzz::resp_stream(data));
