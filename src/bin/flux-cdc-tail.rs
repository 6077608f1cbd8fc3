//! flux-cdc-tail: see `flux_kv::tools::cdc_tail`.
fn main() -> std::process::ExitCode {
    flux_kv::tools::cdc_tail::main()
}
