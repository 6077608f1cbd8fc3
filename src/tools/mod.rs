//! The command-line tools behind the thin binaries in `src/bin/`.

pub mod bench;
pub mod cdc_tail;
pub mod cli;
mod cluster;

/// Parses durations such as `10s`, `250ms`, `2m`; a bare number is milliseconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(std::time::Duration::from_millis(ms));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration (try 10s, 250ms, 2m): {e}"))
}

/// The flags every tool that talks to a node takes for TLS and authentication.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecurityArgs {
    /// File holding `user:secret` (printed by `flux-cli token new`); every connection
    /// authenticates with it.
    #[arg(long, env = "FLUX_TOKEN_FILE")]
    pub token_file: Option<String>,
    /// Speak TLS to the node (implied by --tls-ca and --tls-cert); without --tls-ca the
    /// node's certificate must chain to a public web PKI root.
    #[arg(long)]
    pub tls: bool,
    /// PEM CA certificate(s) the node's certificate must chain to.
    #[arg(long, env = "FLUX_TLS_CA")]
    pub tls_ca: Option<String>,
    /// PEM client certificate, for a node that requires one (tls.client_ca_file).
    #[arg(long, env = "FLUX_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<String>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "FLUX_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<String>,
    /// Name the node's certificate must carry; default: the host given in the address
    /// (or the node's IP address for nodes found through etcd).
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// PEM CA certificate of etcd (with --etcd): TLS to etcd.
    #[arg(long)]
    pub etcd_tls_ca: Option<String>,
    /// PEM client certificate for etcd (with --etcd).
    #[arg(long, requires = "etcd_tls_key")]
    pub etcd_tls_cert: Option<String>,
    /// PEM private key of --etcd-tls-cert.
    #[arg(long, requires = "etcd_tls_cert")]
    pub etcd_tls_key: Option<String>,
}

impl SecurityArgs {
    /// Applies the flags to a client configuration (reads the token and certificates now).
    pub fn apply(&self, config: &mut crate::client::ClientConfig) -> Result<(), String> {
        use crate::tls::ClientFiles;
        let files = ClientFiles::from_flags(&self.tls_ca, &self.tls_cert, &self.tls_key);
        config.security = crate::client::Security::from_files(self.token_file.as_deref(), self.tls, &files)?;
        config.security.server_name = self.tls_server_name.clone();
        config.etcd_tls = ClientFiles::from_flags(&self.etcd_tls_ca, &self.etcd_tls_cert, &self.etcd_tls_key);
        Ok(())
    }
}
