//! What the Debian package ships (Cargo.toml's `[package.metadata.deb]`, `packaging/`):
//! completions and man pages generated from the real CLI, configuration files the server and
//! the agent accept, and systemd units whose command lines the CLI parses and whose paths
//! match what the package installs. `scripts/check-deb` then installs the package and runs it.
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use iotunnel::agent::device::AgentFile;
use iotunnel::cli::Cli;
use iotunnel::config::{FileConfig, Knobs, Settings};

const BIN: &str = env!("CARGO_BIN_EXE_iotunnel");

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs the binary and returns its stdout; fails the test on a non-zero exit.
fn run(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "iotunnel {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The real subcommands and flags every generated document must name.
const SUBCOMMANDS: [&str; 9] = [
    "server",
    "account",
    "key",
    "product",
    "device",
    "client",
    "tunnel",
    "node",
    "access-key",
];

#[test]
fn completions_name_the_real_subcommands_and_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        for word in
            SUBCOMMANDS
                .iter()
                .chain(&["--data-dir", "--product-key", "--ca-file", "--relay-addr"])
        {
            // Flags appear without their dashes in fish's `-l data-dir` form.
            let bare = word.trim_start_matches('-');
            assert!(
                script.contains(word) || script.contains(&format!("-l {bare}")),
                "{shell} completion does not mention {word}"
            );
        }
    }
    let err = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!err.status.success(), "an unknown shell is refused");
}

#[test]
fn man_pages_cover_every_visible_command() {
    let dir = tempfile::tempdir().unwrap();
    run(&["man", "--dir", dir.path().to_str().unwrap()]);
    let page = |name: &str| {
        std::fs::read_to_string(dir.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let main = page("iotunnel.1");
    assert!(main.contains(".TH iotunnel 1"), "{main}");
    for sub in SUBCOMMANDS {
        // roff escapes the dash: iotunnel\-server(1).
        assert!(
            main.contains(&format!("iotunnel\\-{}", sub.replace('-', "\\-"))),
            "iotunnel.1 does not list {sub}"
        );
        let sub_page = page(&format!("iotunnel-{sub}.1"));
        assert!(
            sub_page.contains(&format!(".TH iotunnel-{sub} 1")),
            "{sub_page}"
        );
        let source = format!("\"iotunnel {}\"", env!("CARGO_PKG_VERSION"));
        assert!(sub_page.contains(&source), "{sub_page}");
    }
    assert!(page("iotunnel-server.1").contains("data\\-dir"));
    assert!(page("iotunnel-tunnel-create.1").contains("product\\-key"));
    // The generators themselves stay out of the manual and of --help.
    assert!(!dir.path().join("iotunnel-completions.1").exists());
    assert!(!dir.path().join("iotunnel-man.1").exists());
    assert!(!run(&["--help"]).contains("completions"));
    // Without --dir, iotunnel(1) goes to stdout.
    assert_eq!(run(&["man"]), main);
}

/// `KEY=value` lines of a unit's `[Service]` section (the last assignment of a key wins).
fn unit_setting(unit: &str, key: &str) -> String {
    let text = std::fs::read_to_string(repo(&format!("packaging/systemd/{unit}"))).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .next_back()
        .unwrap_or_else(|| panic!("{unit} has no {key}="))
        .to_string()
}

/// Where `[package.metadata.deb]` installs `source` (a destination ending in `/` keeps the
/// file name).
fn installed_path(source: &str) -> String {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo("Cargo.toml")).unwrap()).unwrap();
    let assets = manifest["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .unwrap();
    let asset = assets
        .iter()
        .map(|a| a.as_array().unwrap())
        .find(|a| a[0].as_str() == Some(source))
        .unwrap_or_else(|| panic!("{source} is not packaged"));
    let dest = asset[1].as_str().unwrap();
    let file = Path::new(source).file_name().unwrap().to_str().unwrap();
    let dest = if dest.ends_with('/') {
        format!("{dest}{file}")
    } else {
        dest.to_string()
    };
    format!("/{dest}")
}

#[test]
fn server_unit_runs_the_packaged_binary_with_the_packaged_config() {
    let exec = unit_setting("iotunnel.service", "ExecStart");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(argv[0], installed_path("target/release/iotunnel"));
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{exec}: {e}"));
    let iotunnel::cli::Command::Server(args) = cli.command else {
        panic!("{exec} does not run the server");
    };
    let config = args.config.clone().expect("--config");
    assert_eq!(
        config.to_str().unwrap(),
        installed_path("packaging/iotunnel.toml")
    );

    // The packaged file, read where the unit points, keeps the data in the unit's state
    // directory, which is also where it runs.
    let file = Knobs::load(&repo("packaging/iotunnel.toml")).unwrap();
    let settings = Settings::merge(Knobs::default(), file, None).unwrap();
    let state = format!(
        "/var/lib/{}",
        unit_setting("iotunnel.service", "StateDirectory")
    );
    assert_eq!(settings.data_dir, PathBuf::from(&state));
    assert_eq!(unit_setting("iotunnel.service", "WorkingDirectory"), state);
    assert_eq!(unit_setting("iotunnel.service", "User"), "iotunnel");
    // Low ports come only from the documented drop-in.
    assert_eq!(unit_setting("iotunnel.service", "AmbientCapabilities"), "");
    let dropin = std::fs::read_to_string(repo("packaging/low-port.conf")).unwrap();
    assert!(dropin.contains("AmbientCapabilities=CAP_NET_BIND_SERVICE"));
    installed_path("packaging/low-port.conf");
}

#[test]
fn device_unit_runs_the_agent_with_the_packaged_config() {
    let exec = unit_setting("iotunnel-device.service", "ExecStart");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(argv[0], installed_path("target/release/iotunnel"));
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{exec}: {e}"));
    let iotunnel::cli::Command::Device(args) = cli.command else {
        panic!("{exec} does not run the agent");
    };
    assert!(args.cmd.is_none(), "{exec} runs a device subcommand");
    let config = args.relay.config.clone().expect("--config");
    assert_eq!(
        config.to_str().unwrap(),
        installed_path("packaging/device.toml")
    );

    let file = AgentFile::load(&repo("packaging/device.toml")).unwrap();
    assert!(file.product_key.is_some() && file.device_name.is_some());
    assert!(file.device_secret.is_some() && file.ca_file.is_some());
    assert_eq!(
        file.services.get("SSH").map(String::as_str),
        Some("127.0.0.1:22")
    );
}

#[test]
fn example_config_leaves_shards_to_the_machine() {
    let text = std::fs::read_to_string(repo("iotunnel.example.toml")).unwrap();
    let file = FileConfig::parse(&text).unwrap();
    assert_eq!(file.shards, None, "the example must not pin a shard count");
    let settings = Settings::merge(Knobs::default(), file, None).unwrap();
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(settings.shards, cores);
}
