//! What the scenarios read from the kernel: CPU time, memory and open files of a process (from
//! `/proc`), the whole machine's CPU time, and this process's open-file limit.
//!
//! The only `unsafe` of the crate lives here (libc calls that read or set a value).

/// `(utime, stime)` in clock ticks from `/proc/{pid}/stat` (`pid` may be `self`).
pub fn cpu_ticks(pid: &str) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// Jiffies of all CPUs together, from the `cpu` line of `/proc/stat`.
#[derive(Clone, Copy, Debug)]
pub struct MachineTicks {
    /// Everything but idle and iowait.
    pub busy: u64,
    /// Of which softirq (the kernel's network receive work lands here when the kernel
    /// accounts IRQ time apart from tasks).
    pub softirq: u64,
    /// All ticks.
    pub total: u64,
    /// CPUs listed (`cpuN` lines): the whole machine, whatever this process's affinity.
    pub cpus: usize,
}

/// The machine's CPU ticks now.
pub fn machine_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    Some(MachineTicks {
        busy: total - idle,
        softirq: v.get(6).copied().unwrap_or(0),
        total,
        cpus: stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count(),
    })
}

/// utime+stime, in clock ticks, of every `ksoftirqd/N` kernel thread.
pub fn ksoftirqd_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .filter_map(|e| cpu_ticks(e.file_name().to_str()?))
        .map(|(u, s)| u + s)
        .sum()
}

/// Clock ticks per second (`_SC_CLK_TCK`).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// A process's resident memory and open files at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcUsage {
    /// `VmRSS` of `/proc/PID/status`, bytes.
    pub rss_bytes: u64,
    /// Entries of `/proc/PID/fd`.
    pub fds: u64,
}

/// RSS and open files of `pid` (`self` for this process); an error names the pid.
pub fn proc_usage(pid: &str) -> anyhow::Result<ProcUsage> {
    use anyhow::Context;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status (is process {pid} running?)"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("/proc/{pid}/status has no VmRSS line"))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("cannot list /proc/{pid}/fd (another user's process?)"))?
        .count() as u64;
    Ok(ProcUsage {
        rss_bytes: rss_kib * 1024,
        fds,
    })
}

/// A process's RSS and open files at one moment of a run.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UsageSample {
    /// Seconds since the sampler started (the scenario's start, setup included).
    pub t: f64,
    /// `VmRSS`, bytes.
    pub rss_bytes: u64,
    /// Open files.
    pub fds: u64,
}

/// Once a second, reads a process's RSS and open files in a task of its own until stopped:
/// the usage over a run (growth while pairs connect, what is given back), for the chart.
pub struct UsageSampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<UsageSample>>,
}

/// How often [`UsageSampler`] reads: listing `/proc/PID/fd` of a relay holding 100k sockets
/// takes milliseconds, so once a second costs the relay nothing measurable.
const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl UsageSampler {
    /// Starts sampling `pid` (`self` for this process). A process that cannot be read ends
    /// the samples, it fails nothing.
    pub fn start(pid: String) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                let done = tokio::select! {
                    _ = tick.tick() => false,
                    _ = stopped.wait_for(|s| *s) => true,
                };
                let Ok(u) = proc_usage(&pid) else {
                    return samples;
                };
                samples.push(UsageSample {
                    t: (t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
                    rss_bytes: u.rss_bytes,
                    fds: u.fds,
                });
                if done {
                    return samples;
                }
            }
        });
        Self { stop, task }
    }

    /// Takes a last sample and returns them all.
    pub async fn finish(self) -> Vec<UsageSample> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

/// Raises this process's soft open-file limit to the hard one; returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` on a socket about to be bound to a source address, so the
/// port is chosen at connect time per destination and each source address gets the whole
/// ephemeral range.
pub fn bind_address_no_port(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `fd` is an open socket the caller owns; the option value is a c_int on our stack.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        assert!(cpu_ticks("self").is_some());
        let m = machine_ticks().unwrap();
        assert!(m.softirq <= m.busy && m.busy <= m.total);
        assert!(m.cpus >= 1);
        let _ = ksoftirqd_ticks();
        let u = proc_usage("self").unwrap();
        assert!(u.rss_bytes > 0 && u.fds >= 3, "{u:?}");
        assert!(proc_usage("999999999").is_err());
        assert!(raise_fd_limit() > 0);
    }

    #[tokio::test]
    async fn samples_over_time() {
        let sampler = UsageSampler::start("self".into());
        tokio::task::yield_now().await;
        let samples = sampler.finish().await;
        assert!(!samples.is_empty());
        assert!(samples.iter().all(|s| s.rss_bytes > 0 && s.fds >= 3));
        assert!(samples.windows(2).all(|w| w[0].t <= w[1].t));
        let none = UsageSampler::start("999999999".into()).finish().await;
        assert!(none.is_empty());
    }
}

/// Kernel events the relay's threads cause, counted by `perf stat` over the measured window:
/// what makes a GiB cost more as tunnels per shard grow (issue 12, item 4).
pub const KERNEL_EVENTS: [(&str, &str); 4] = [
    ("syscalls", "raw_syscalls:sys_enter"),
    ("uring_submissions", "io_uring:io_uring_submit_req"),
    ("uring_completions", "io_uring:io_uring_complete"),
    ("context_switches", "context-switches"),
];

/// A running `perf stat` attached to a process.
pub struct KernelEventCounter {
    child: std::process::Child,
}

impl KernelEventCounter {
    /// Starts counting [`KERNEL_EVENTS`] of `pid`'s threads (needs `perf` and tracepoint
    /// access, which root has).
    pub fn start(pid: u32) -> anyhow::Result<Self> {
        let events: Vec<&str> = KERNEL_EVENTS.iter().map(|(_, e)| *e).collect();
        let child = std::process::Command::new("perf")
            .args([
                "stat",
                "-x",
                ",",
                "-e",
                &events.join(","),
                "-p",
                &pid.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot run perf (needed for --kernel-events): {e}"))?;
        Ok(Self { child })
    }

    /// Stops counting; returns each event's count by its short name.
    pub fn stop(self) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill(2) with a child's pid and SIGINT reads only its integer arguments.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let out = self.child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stderr);
        let counts = parse_perf_csv(&text);
        if counts.len() != KERNEL_EVENTS.len() {
            anyhow::bail!(
                "perf stat counted {} of {} events: {text}",
                counts.len(),
                KERNEL_EVENTS.len()
            );
        }
        Ok(counts)
    }
}

/// Reads `count,unit,event,...` lines of `perf stat -x ,` into short names and counts.
fn parse_perf_csv(text: &str) -> std::collections::BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(',');
            let count = f.next()?.trim().parse().ok()?;
            let event = f.nth(1)?.trim();
            let (name, _) = KERNEL_EVENTS.iter().find(|(_, e)| *e == event)?;
            Some((name.to_string(), count))
        })
        .collect()
}

#[cfg(test)]
mod kernel_event_tests {
    #[test]
    fn perf_csv_lines_parse() {
        let text = "1234,,raw_syscalls:sys_enter,5000,100.00,,\n\
                    <not counted>,,io_uring:io_uring_submit_req,0,0.00,,\n\
                    56,,context-switches,5000,100.00,,\n";
        let got = super::parse_perf_csv(text);
        assert_eq!(got.get("syscalls"), Some(&1234));
        assert_eq!(got.get("context_switches"), Some(&56));
        assert_eq!(got.len(), 2, "an uncounted event is left out: {got:?}");
    }
}
