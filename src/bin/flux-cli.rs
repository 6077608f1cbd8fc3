//! flux-cli: see `flux_kv::tools::cli`.
fn main() -> std::process::ExitCode {
    flux_kv::tools::cli::main()
}
