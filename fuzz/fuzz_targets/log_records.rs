//! Fuzz target: see `flux_kv::fuzz::log_records`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flux_kv::fuzz::log_records(data));
