//! flux-bench: see `flux_kv::tools::bench`.
fn main() -> std::process::ExitCode {
    flux_kv::tools::bench::main()
}
