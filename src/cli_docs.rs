//! Shell completions and man pages, generated from the clap definitions in [`crate::cli`] so
//! they never drift from the real flags: `iotunnel completions SHELL` prints a completion
//! script, `iotunnel man --dir DIR` writes one page per command (`iotunnel.1`,
//! `iotunnel-server.1`, `iotunnel-tunnel-create.1`, ...). Both subcommands are hidden from
//! `--help`; `scripts/package` runs them to put the files into the Debian package.
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// The name completions are registered for: the installed binary's.
const BIN_NAME: &str = "iotunnel";

/// Writes the completion script for `shell` to `out`.
pub fn write_completions(shell: Shell, out: &mut dyn Write) -> anyhow::Result<()> {
    // Rendered into memory first: clap_complete panics on a write error (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), BIN_NAME, &mut script);
    out.write_all(&script)
        .and_then(|()| out.flush())
        .context("cannot write the completion script")
}

/// The whole command tree, built (so each subcommand knows its full name, `iotunnel-server`),
/// without clap's `help` subcommand, which has no page of its own.
fn command_tree() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// One command's page; every page names the same source, `iotunnel VERSION` (clap_mangen
/// would name a subcommand's page after the subcommand alone).
fn page(cmd: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(cmd)
        .source(format!("iotunnel {}", env!("CARGO_PKG_VERSION")))
        .manual("iotunnel manual")
}

/// Writes the man page of every visible command into `dir` (created if missing).
pub fn write_man_pages(dir: &Path) -> anyhow::Result<()> {
    fn write_tree(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write_tree(sub.clone(), dir)?;
        }
        page(cmd).generate_to(dir).map(drop)
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_tree(command_tree(), dir)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))
}

/// Writes the top-level page, `iotunnel(1)`, to `out`.
pub fn write_main_man_page(out: &mut dyn Write) -> anyhow::Result<()> {
    page(command_tree())
        .render(out)
        .and_then(|()| out.flush())
        .context("cannot write the man page")
}
