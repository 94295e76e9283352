//! `--procs K`: the scenario runs in K child processes (this binary again), each with its share
//! of the tunnels (and of the rate), and the parent merges their results.
//!
//! A child is this binary with `IOTUNNEL_LOADTEST_CHILD=1`. It speaks over its stdin and
//! stdout, one line each:
//! ```text
//! child -> parent   ready             setup done (pairs connected), waiting
//! parent -> child   go                start the measured phase (all children at once)
//! child -> parent   result {json}     its part of the results
//! ```
//! Its stderr goes to the parent's stderr. The parent itself opens no peer, so K processes hold
//! K times the open files one may.
use std::future::Future;
use std::process::Stdio;

use anyhow::{anyhow, bail, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Set in a child's environment.
const CHILD_ENV: &str = "IOTUNNEL_LOADTEST_CHILD";

/// True in a child process.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// In a child: tells the parent that setup is done and waits for its `go`. Elsewhere: nothing.
pub async fn ready() -> anyhow::Result<()> {
    if !is_child() {
        return Ok(());
    }
    println!("ready");
    let mut line = String::new();
    let mut stdin = BufReader::new(tokio::io::stdin());
    stdin.read_line(&mut line).await?;
    if line.trim() != "go" {
        bail!("the parent process went away");
    }
    Ok(())
}

/// In a child: hands the results to the parent.
pub fn emit<T: Serialize>(part: &T) -> anyhow::Result<()> {
    println!("result {}", serde_json::to_string(part)?);
    Ok(())
}

/// `total` split over `k` shares: share `i`'s part (the first ones take the remainder).
pub fn share(total: u64, k: usize, i: usize) -> u64 {
    let k = k as u64;
    total / k + u64::from((i as u64) < total % k)
}

/// Fails unless every one of `procs` processes gets at least one of `tunnels`.
pub fn check_tunnels(procs: u32, tunnels: u32) -> anyhow::Result<()> {
    if tunnels < procs {
        bail!("--procs {procs} needs at least {procs} --tunnels");
    }
    Ok(())
}

/// Child `i`'s flags when only the tunnels are split over `k` children.
pub fn tunnel_flags(tunnels: u32, k: usize, i: usize) -> Vec<(&'static str, String)> {
    vec![("--tunnels", share(tunnels.into(), k, i).to_string())]
}

/// The `--procs` split of a scenario. With `k > 1`: starts `k` children with `flags(i)` (see
/// [`Children::spawn`]), waits until all are ready, starts them together and merges their
/// results. Otherwise: runs `measure` here; in a child, hands its result to the parent and
/// returns `None` (the parent prints and judges).
pub async fn split<R, F>(
    k: usize,
    flags: impl Fn(usize) -> Vec<(&'static str, String)>,
    merge: impl FnOnce(Vec<R>) -> R,
    measure: F,
) -> anyhow::Result<Option<R>>
where
    R: Serialize + DeserializeOwned,
    F: Future<Output = anyhow::Result<R>>,
{
    if k > 1 {
        let mut kids = Children::spawn(k, flags)?;
        kids.wait_ready().await?;
        kids.go().await?;
        return Ok(Some(merge(kids.results().await?)));
    }
    let report = measure.await?;
    if is_child() {
        emit(&report)?;
        return Ok(None);
    }
    Ok(Some(report))
}

/// `args` without the flags in `drop` (and their values), with `set` appended.
fn rewrite_args(args: &[String], drop: &[&str], set: &[(&str, String)]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 2 * set.len());
    let mut skip_next = false;
    for a in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        let name = a.split('=').next().unwrap_or(a);
        if drop.contains(&name) || set.iter().any(|(f, _)| *f == name) {
            skip_next = !a.contains('=');
            continue;
        }
        out.push(a.clone());
    }
    for (f, v) in set {
        out.push((*f).to_string());
        out.push(v.clone());
    }
    out
}

struct Kid {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

/// The running children.
pub struct Children {
    kids: Vec<Kid>,
}

impl Children {
    /// Starts `k` children with this process's arguments, less `--procs` and `--json`, plus
    /// `flags(i)` for child `i` (e.g. its `--tunnels` share).
    pub fn spawn(
        k: usize,
        flags: impl Fn(usize) -> Vec<(&'static str, String)>,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this program's path")?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut kids = Vec::with_capacity(k);
        for i in 0..k {
            let mut set = flags(i);
            set.push(("--procs", "1".into()));
            let argv = rewrite_args(&args, &["--json"], &set);
            let mut child = Command::new(&exe)
                .args(&argv)
                .env(CHILD_ENV, "1")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start child {i} ({})", exe.display()))?;
            let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
            let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
            kids.push(Kid {
                child,
                stdin,
                lines: BufReader::new(stdout).lines(),
            });
        }
        Ok(Self { kids })
    }

    /// Waits until every child has said `ready`.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        for (i, kid) in self.kids.iter_mut().enumerate() {
            expect_line(kid, i, "ready").await?;
        }
        Ok(())
    }

    /// Tells every child to start.
    pub async fn go(&mut self) -> anyhow::Result<()> {
        for kid in &mut self.kids {
            kid.stdin.write_all(b"go\n").await?;
            kid.stdin.flush().await?;
        }
        Ok(())
    }

    /// Collects every child's result and waits for it to exit.
    pub async fn results<T: DeserializeOwned>(mut self) -> anyhow::Result<Vec<T>> {
        let mut out = Vec::with_capacity(self.kids.len());
        for (i, kid) in self.kids.iter_mut().enumerate() {
            let line = expect_line(kid, i, "result").await?;
            let json = line.strip_prefix("result ").unwrap_or_default();
            out.push(
                serde_json::from_str(json)
                    .with_context(|| format!("child {i} sent an unreadable result"))?,
            );
            let status = kid.child.wait().await?;
            if !status.success() {
                bail!("child {i} exited with {status} (its error is above)");
            }
        }
        Ok(out)
    }
}

/// Reads child `i`'s lines until one starts with `word`; an early end is the child's failure.
async fn expect_line(kid: &mut Kid, i: usize, word: &str) -> anyhow::Result<String> {
    loop {
        match kid.lines.next_line().await? {
            Some(line) if line.starts_with(word) => return Ok(line),
            Some(_) => {}
            None => {
                let status = kid.child.wait().await?;
                bail!("child {i} ended ({status}) before `{word}`: its error is above");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        for (total, k) in [(10u64, 3usize), (2, 4), (9000, 4)] {
            let parts: Vec<u64> = (0..k).map(|i| share(total, k, i)).collect();
            assert_eq!(parts.iter().sum::<u64>(), total);
            assert!(parts.iter().max().unwrap() - parts.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn args_are_rewritten() {
        let args: Vec<String> = [
            "idle",
            "--tunnels",
            "100",
            "--procs=4",
            "--json",
            "a.json",
            "--direct",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = rewrite_args(
            &args,
            &["--json"],
            &[("--tunnels", "25".into()), ("--procs", "1".into())],
        );
        assert_eq!(out, ["idle", "--direct", "--tunnels", "25", "--procs", "1"]);
    }
}
