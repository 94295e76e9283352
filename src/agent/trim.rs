//! Gives freed memory back to the system once connections close. glibc's allocator keeps freed
//! heap pages for reuse, so a burst of a thousand connections would otherwise hold the burst's
//! peak RSS for good; `malloc_trim(0)` returns every free page, also those inside the heap.
//! The agent's and the client's only `unsafe` is that call.
#![allow(unsafe_code)]
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the trimmer looks for closed connections: at most one trim per interval.
const INTERVAL: Duration = Duration::from_secs(2);

/// Local connections closed in this process so far.
static CLOSED: AtomicU64 = AtomicU64::new(0);

/// Counts a closed local connection.
pub(super) fn connection_closed() {
    CLOSED.fetch_add(1, Ordering::Relaxed);
}

/// The trimmer task; it stops when this is dropped.
pub struct Trimmer(tokio::task::JoinHandle<()>);

impl Drop for Trimmer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts trimming the heap after each interval in which connections closed.
pub fn spawn() -> Trimmer {
    Trimmer(tokio::spawn(run()))
}

async fn run() {
    let mut seen = CLOSED.load(Ordering::Relaxed);
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tick.tick().await;
        let closed = CLOSED.load(Ordering::Relaxed);
        if closed != seen {
            seen = closed;
            let _ = tokio::task::spawn_blocking(trim).await;
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
