//! Which log lines are written: `IOTUNNEL_LOG`, else `RUST_LOG` (the ecosystem's variable), else
//! the command's default level, in `tracing_subscriber::EnvFilter` syntax, plus the targets that
//! stay quiet unless asked for by name.
use tracing_subscriber::EnvFilter;

/// The variable that wins when both are set.
pub const IOTUNNEL_LOG: &str = "IOTUNNEL_LOG";
/// The ecosystem's variable, read when `IOTUNNEL_LOG` is unset or empty.
pub const RUST_LOG: &str = "RUST_LOG";

/// The filter for the process's environment.
pub fn filter(default_level: &str) -> EnvFilter {
    let var = |name| std::env::var(name).ok();
    let spec = directives(var(IOTUNNEL_LOG), var(RUST_LOG), default_level);
    EnvFilter::try_new(spec).unwrap_or_else(|_| EnvFilter::new(default_level))
}

/// The filter directives for the values of `IOTUNNEL_LOG` and `RUST_LOG`.
pub fn directives(
    iotunnel_log: Option<String>,
    rust_log: Option<String>,
    default_level: &str,
) -> String {
    let set = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
    let asked = set(iotunnel_log)
        .or(set(rust_log))
        .unwrap_or_else(|| default_level.to_string());
    // The WebSocket libraries trace whole frames, notifications with tokens included: never
    // below info, whatever was asked.
    let mut spec = format!("{asked},tungstenite=info,tokio_tungstenite=info");
    // rustls warns once per ClientHello that breaks RFC 6066 (an IP address as SNI, which some
    // clients send when dialling an address): a remote peer's mistake, harmless (the name is
    // ignored) and one line per connection. Errors only, unless rustls is asked for by name.
    if !asked.contains("rustls") {
        spec.push_str(",rustls::msgs::handshake=error");
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(iotunnel: Option<&str>, rust: Option<&str>) -> String {
        directives(iotunnel.map(Into::into), rust.map(Into::into), "info")
    }

    #[test]
    fn iotunnel_log_wins_then_rust_log_then_the_default() {
        assert!(d(Some("debug"), Some("trace")).starts_with("debug,"));
        assert!(d(None, Some("trace")).starts_with("trace,"));
        assert!(d(Some(" "), Some("warn")).starts_with("warn,"));
        assert!(d(None, None).starts_with("info,"));
    }

    #[test]
    fn rustls_handshake_warnings_are_quiet_unless_named() {
        assert!(d(None, Some("debug")).ends_with(",rustls::msgs::handshake=error"));
        assert!(!d(None, Some("info,rustls=warn")).contains("handshake=error"));
        for spec in [d(None, None), d(Some("iotunnel=debug"), None)] {
            assert!(EnvFilter::try_new(&spec).is_ok(), "{spec}");
        }
    }
}
