//! Wakes core executors that glommio left asleep while they start.
//!
//! glommio parks an executor in `io_uring_enter` on its main ring, linked by a poll request
//! to its latency ring, whose timeout is meant to end the sleep; another executor's notice
//! (a mesh peer registering) arrives on an eventfd. Under load, an executor was seen asleep
//! there with its timer long expired and its peer registered: about one start in 100 on
//! two loaded CPUs (a known class of glommio problem: DataDog/glommio#326 and #547). It
//! stays asleep until something interrupts the system call, so the node never became ready.
//!
//! The cure is that interruption: while cores start, the main thread sends each core that
//! has not yet reported a signal with an empty handler every [`WAKE_INTERVAL`]. The system
//! call returns `EINTR`, which glommio treats as a normal wake-up: it processes its timers
//! and notices and carries on. The handler is installed with `SA_RESTART`, so any other
//! system call the signal lands in is restarted, not failed.

use std::sync::{Mutex, Once};
use std::time::Duration;

/// How long start-up waits for a core's report before it wakes the cores still starting.
/// Starts take milliseconds; a core asleep by mistake costs at most this much.
pub const WAKE_INTERVAL: Duration = Duration::from_millis(50);

/// The executor threads still starting, by thread id.
#[derive(Default)]
pub struct Starting {
    threads: Mutex<Vec<libc::pid_t>>,
}

impl Starting {
    /// Registers the calling thread as a starting core; returns its thread id for
    /// [`Starting::leave`].
    pub fn enter(&self) -> libc::pid_t {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        if let Ok(mut t) = self.threads.lock() {
            t.push(tid);
        }
        tid
    }

    /// The thread `tid` is done starting (ready or failed).
    pub fn leave(&self, tid: libc::pid_t) {
        if let Ok(mut t) = self.threads.lock() {
            t.retain(|&x| x != tid);
        }
    }

    /// Interrupts every thread still starting; returns how many.
    pub fn wake(&self) -> usize {
        install_handler();
        let Ok(threads) = self.threads.lock() else {
            return 0;
        };
        // SAFETY: getpid has no preconditions; tgkill only signals a thread of this process
        // (a thread that has exited by now makes it fail with ESRCH, which is harmless).
        let pid = unsafe { libc::getpid() };
        threads
            .iter()
            .filter(|&&tid| unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, wake_signal()) } == 0)
            .count()
    }
}

/// The first real-time signal the C library leaves to programs: nothing else here uses it.
fn wake_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn ignore(_: libc::c_int) {}

/// Installs the empty handler once. Not `SIG_IGN`: an ignored signal does not interrupt.
fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe (it does
        // nothing) and the mask is emptied before use.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(wake_signal(), &action, std::ptr::null_mut()) != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "cannot install the start-up wake signal handler");
            }
        }
    });
}
