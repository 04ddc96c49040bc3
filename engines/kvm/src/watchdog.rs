//! Stops a vCPU that runs too long: after the deadline a thread signals the vCPU thread, whose KVM_RUN then
//! returns EINTR, and the run loop reports the timeout.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

extern "C" fn interrupt_kvm_run(_signal: libc::c_int) {}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Installs a do-nothing handler, without SA_RESTART, so that the signal interrupts KVM_RUN instead of
/// killing the process.
fn install_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: `sigaction` is plain data, zeroed then filled in; the handler is async-signal-safe (it does
        // nothing).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = interrupt_kvm_run as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(kick_signal(), &action, std::ptr::null_mut());
        }
    });
}

/// Watches the thread that created it. It must be dropped on that thread: the SAFETY argument of the signal
/// sent to `target` is that the target joins the watching thread (in `drop`) before it can exit. So `Watchdog` is
/// not `Send` (the raw-pointer marker), and the build checks it stays so (the anonymous constant below).
pub struct Watchdog {
    deadline: Instant,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _stays_on_its_thread: PhantomData<*const ()>,
}

/// Fails to compile if `Watchdog` becomes `Send`: with a `Send` type both impls below apply and the call is
/// ambiguous.
const _: fn() = || {
    trait AmbiguousIfSend<Marker> {
        fn check() {}
    }
    impl<T: ?Sized> AmbiguousIfSend<()> for T {}
    impl<T: ?Sized + Send> AmbiguousIfSend<u8> for T {}
    <Watchdog as AmbiguousIfSend<_>>::check();
};

impl Watchdog {
    /// Starts watching the calling thread.
    pub fn start(timeout: Duration) -> Watchdog {
        install_handler();
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let deadline = Instant::now() + timeout;
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                while !done.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now >= deadline {
                        // SAFETY: `target` is alive: `Watchdog::drop` (on that thread) sets `done` and joins this
                        // thread before the target can exit.
                        unsafe { libc::pthread_kill(target, kick_signal()) };
                        std::thread::sleep(Duration::from_millis(20));
                    } else {
                        std::thread::sleep((deadline - now).min(Duration::from_millis(20)));
                    }
                }
            })
        };
        Watchdog { deadline, done, thread: Some(thread), _stays_on_its_thread: PhantomData }
    }

    pub fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
