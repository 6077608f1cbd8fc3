//! The systemd unit and its example configuration.

// Goal: the example configuration file loads as a valid config (unknown keys or bad values
// would stop the service at start).
#[test]
fn example_config_loads() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/flux.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flux-server"))
        .args(["--config", path, "--print-config"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config: flux_kv::config::Config = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(config.listen, "0.0.0.0:7379");
    assert_eq!(config.data_dir, std::path::PathBuf::from("/var/lib/flux"));
}

// Goal: the unit files (the server, and the daily backup's service and timer) are valid for
// systemd (systemd-analyze verify, which needs no running systemd; the binary paths they
// name are pointed at the built binaries for the check).
#[test]
fn unit_files_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = [
        ("flux-server.service", include_str!("../systemd/flux-server.service")),
        ("flux-backup.service", include_str!("../systemd/flux-backup.service")),
        ("flux-backup.timer", include_str!("../systemd/flux-backup.timer")),
    ];
    let mut paths = Vec::new();
    for (name, text) in units {
        let unit = text
            .replace("/usr/local/bin/flux-server", env!("CARGO_BIN_EXE_flux-server"))
            .replace("/usr/local/bin/flux-cli", env!("CARGO_BIN_EXE_flux-cli"))
            .replace("User=flux\n", "")
            .replace("Group=flux\n", "");
        let path = dir.path().join(name);
        std::fs::write(&path, unit).unwrap();
        paths.push(path);
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .expect("systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    // Only complaints about these units count (the host's own units may produce noise).
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| units.iter().any(|(name, _)| l.contains(name)))
        .collect();
    assert!(out.status.success() && ours.is_empty(), "{err}");
}

// Goal: the unit's sandbox keeps systemd's exposure score at or under 2.0 (printed, so a
// change that loosens it shows in the test log).
#[test]
fn unit_exposure_is_at_most_two() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/flux-server.service");
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", path])
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for flux-server.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure figure:\n{text}\n{}", String::from_utf8_lossy(&out.stderr)));
    println!("systemd-analyze security exposure: {exposure}");
    assert!(exposure <= 2.0, "exposure {exposure}:\n{text}");
}

// Goal: the example alerting rules load in Prometheus (promtool check rules).
#[test]
fn alert_rules_check() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/prometheus/flux-alerts.yml");
    let out = std::process::Command::new("promtool")
        .args(["check", "rules", path])
        .output()
        .expect("promtool (Debian package prometheus) must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("SUCCESS"), "{text}");
}
