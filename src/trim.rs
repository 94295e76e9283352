//! Gives freed memory back to the system once connections stop closing. glibc's allocator keeps
//! freed heap pages for reuse, so a burst of a thousand connections would otherwise hold the
//! burst's peak RSS for good; `malloc_trim(0)` returns every free page of every arena, also
//! those inside the heap. The relay's peers and the agent's and the client's local connections
//! count here; each process runs one trimmer. Its only `unsafe` is that call.
#![allow(unsafe_code)]
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the trimmer looks for closed connections. It trims after the first interval with
/// no close following one with closes: once a burst is over, not during steady churn (whose
/// memory is in use again at once).
const INTERVAL: Duration = Duration::from_secs(1);

/// Local connections closed in this process so far.
static CLOSED: AtomicU64 = AtomicU64::new(0);

/// Counts a closed connection.
pub fn connection_closed() {
    CLOSED.fetch_add(1, Ordering::Relaxed);
}

/// The trimmer task; it stops when this is dropped.
pub struct Trimmer(tokio::task::JoinHandle<()>);

impl Drop for Trimmer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts trimming the heap after each burst of closed connections.
pub fn spawn() -> Trimmer {
    Trimmer(tokio::spawn(run()))
}

async fn run() {
    let mut bursts = Bursts::new(CLOSED.load(Ordering::Relaxed));
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tick.tick().await;
        if bursts.ended(CLOSED.load(Ordering::Relaxed)) {
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}

/// Tells, interval by interval, when a burst of closes has ended.
struct Bursts {
    /// The close count at the last look.
    seen: u64,
    /// Whether connections closed since the last trim.
    in_burst: bool,
}

impl Bursts {
    fn new(closed: u64) -> Self {
        Self {
            seen: closed,
            in_burst: false,
        }
    }

    /// Takes the close count at the end of an interval; true when it is the first quiet
    /// interval after closes.
    fn ended(&mut self, closed: u64) -> bool {
        if closed != self.seen {
            (self.seen, self.in_burst) = (closed, true);
            false
        } else {
            std::mem::take(&mut self.in_burst)
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes its own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::Bursts;

    #[test]
    fn trims_once_after_a_burst_and_never_during_churn() {
        let mut b = Bursts::new(5);
        assert!(!b.ended(5), "nothing closed yet");
        let churn: Vec<bool> = [10, 20, 30].iter().map(|&c| b.ended(c)).collect();
        assert_eq!(
            churn,
            [false, false, false],
            "closes every interval: no trim"
        );
        assert!(b.ended(30), "the first quiet interval trims");
        assert!(!b.ended(30), "and only once");
    }
}
