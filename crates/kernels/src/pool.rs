//! A small fork-join thread pool for the forward pass.
//!
//! Workers are spawned once. `run(f)` runs `f(ith, nth)` once for every `ith` in `0..nth`
//! and returns when all are done: no allocation and no thread spawn per call. The indices
//! are claimed from a shared counter by whichever thread gets there first, the caller
//! included, so a worker that is descheduled (another process on its core, a busy VM host)
//! or still asleep does not hold the call up: the caller runs its share, and waits only
//! for indices some thread has started. Idle workers spin briefly (a decode step issues
//! hundreds of small jobs back to back), then sleep on a condition variable so an idle
//! server burns no CPU.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// Spin iterations before a worker goes to sleep (roughly 50-100 µs).
const SPIN_LIMIT: u32 = 1 << 14;

/// Bits of [`Shared::claim`] that hold the next index (the rest hold the call's epoch).
const INDEX_BITS: u32 = 16;

struct Shared {
    /// Points at a `Job` on the stack of the thread inside `run`; read only after claiming
    /// an index of the current call, and the call does not return before that index is done.
    job: AtomicPtr<()>,
    /// `epoch << INDEX_BITS | next index to claim` of the current call.
    claim: AtomicU64,
    /// Bumped once per call; workers wait for it to change.
    epoch: AtomicUsize,
    /// Indices of the current call finished.
    done: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Workers asleep on `wake` (changed under `lock`), so `run` skips the wake-up system
    /// call while everyone is spinning, as in a decode step.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Shared {
    /// The next unclaimed index of call `epoch` (with `nth` indices), if any is left.
    fn try_claim(&self, epoch: usize, nth: usize) -> Option<usize> {
        let mask = (1u64 << INDEX_BITS) - 1;
        let mut cur = self.claim.load(Ordering::Acquire);
        loop {
            let i = (cur & mask) as usize;
            if cur >> INDEX_BITS != epoch as u64 || i >= nth {
                return None;
            }
            match self.claim.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(i),
                Err(now) => cur = now,
            }
        }
    }
}

pub struct ThreadPool {
    n_threads: usize,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes callers of `run`.
    run_lock: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ThreadPool({})", self.n_threads)
    }
}

impl ThreadPool {
    /// A pool of `n_threads` (the caller counts as one; `n_threads - 1` are spawned; at most
    /// 65535).
    pub fn new(n_threads: usize) -> ThreadPool {
        let n_threads = n_threads.clamp(1, (1 << INDEX_BITS) - 1);
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            claim: AtomicU64::new(0),
            epoch: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..n_threads)
            .map(|ith| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("capy-worker-{ith}"))
                    .spawn(move || worker(shared, n_threads))
                    .expect("spawning a worker thread")
            })
            .collect();
        ThreadPool {
            n_threads,
            shared,
            workers,
            run_lock: Mutex::new(()),
        }
    }

    /// Number of threads, the caller included.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `f(ith, nth)` once for every `ith` in `0..nth` in parallel and waits for all.
    /// Which thread runs which index is not fixed (the caller may run several).
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let nth = self.n_threads;
        if nth == 1 {
            f(0, 1);
            return;
        }
        let _serial = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let job: Job<'_> = f;
        let sh = &*self.shared;
        sh.job
            .store(&job as *const Job<'_> as *mut (), Ordering::Relaxed);
        sh.done.store(0, Ordering::Relaxed);
        let epoch = sh.epoch.load(Ordering::Relaxed).wrapping_add(1) & ((1 << 40) - 1);
        // publishes the job pointer to whoever claims an index (Release / Acquire)
        sh.claim
            .store((epoch as u64) << INDEX_BITS, Ordering::Release);
        {
            let _g = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.epoch.store(epoch, Ordering::Release);
        }
        // a worker that counted itself asleep did so under the lock, before this call's
        // critical section (then it is seen here) or after (then it saw the new epoch)
        if sh.sleepers.load(Ordering::Relaxed) > 0 {
            sh.wake.notify_all();
        }
        // the caller claims indices too, until none is left; a panic is kept for later (the
        // job lives on this stack: every claimed index must finish first)
        let mut mine = Ok(());
        while let Some(i) = sh.try_claim(epoch, nth) {
            let r = catch_unwind(AssertUnwindSafe(|| f(i, nth)));
            if mine.is_ok() {
                mine = r;
            }
            sh.done.fetch_add(1, Ordering::Release);
        }
        let mut spins = 0u32;
        while sh.done.load(Ordering::Acquire) != nth {
            if spins < SPIN_LIMIT {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if sh.panicked.swap(false, Ordering::Relaxed) {
            panic!("a worker thread panicked");
        }
    }
}

fn worker(shared: Arc<Shared>, nth: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0u32;
        loop {
            let e = shared.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            if shared.shutdown.load(Ordering::Relaxed) {
                return;
            }
            if spins < SPIN_LIMIT {
                spins += 1;
                std::hint::spin_loop();
            } else {
                let mut g = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
                shared.sleepers.fetch_add(1, Ordering::Relaxed);
                while shared.epoch.load(Ordering::Acquire) == seen
                    && !shared.shutdown.load(Ordering::Relaxed)
                {
                    g = shared.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                shared.sleepers.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if shared.shutdown.load(Ordering::Relaxed) {
            return;
        }
        #[cfg(test)]
        if tests::WORKERS_PAUSED.load(Ordering::SeqCst) {
            continue;
        }
        // a call that has already returned has no index left to claim
        while let Some(i) = shared.try_claim(seen, nth) {
            let ptr = shared.job.load(Ordering::Relaxed) as *const Job<'_>;
            // SAFETY: `run` stored a pointer to a live `Job` before publishing this call's
            // claims (Release, observed by the claim's Acquire), and does not return before
            // the claimed index `i` is counted done, which happens only after this call.
            let job: Job<'_> = unsafe { *ptr };
            if catch_unwind(AssertUnwindSafe(|| job(i, nth))).is_err() {
                shared.panicked.store(true, Ordering::Relaxed);
            }
            shared.done.fetch_add(1, Ordering::Release);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.shutdown.store(true, Ordering::Relaxed);
        }
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Splits `0..n` into `nth` nearly equal contiguous ranges and returns the `ith`.
pub fn split_range(n: usize, ith: usize, nth: usize) -> std::ops::Range<usize> {
    let per = n / nth;
    let rem = n % nth;
    let start = ith * per + ith.min(rem);
    let len = per + usize::from(ith < rem);
    start..start + len
}

/// A mutable slice shared by pool threads that write disjoint elements.
pub struct SharedMut<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: access goes through `unsafe` methods whose callers guarantee disjointness.
unsafe impl<T: Send> Sync for SharedMut<T> {}
unsafe impl<T: Send> Send for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub fn new(s: &mut [T]) -> SharedMut<T> {
        SharedMut {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// # Safety
    /// No other thread may access `range` while the returned slice lives, and the
    /// original slice must outlive it.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, range: std::ops::Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (asserted); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }

    /// # Safety
    /// No other thread may access element `i` concurrently.
    pub unsafe fn write(&self, i: usize, v: T) {
        assert!(i < self.len);
        // SAFETY: in bounds (asserted); exclusivity is the caller's contract.
        unsafe { self.ptr.add(i).write(v) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_once_per_call() {
        let pool = ThreadPool::new(3);
        let hits = [const { AtomicUsize::new(0) }; 3];
        for _ in 0..1000 {
            pool.run(&|ith, nth| {
                assert_eq!(nth, 3);
                hits[ith].fetch_add(1, Ordering::Relaxed);
            });
        }
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 1000);
        }
    }

    #[test]
    fn split_covers_range() {
        for n in 0..50 {
            for nth in 1..6 {
                let mut next = 0;
                for ith in 0..nth {
                    let r = split_range(n, ith, nth);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn shared_writes_land() {
        let pool = ThreadPool::new(2);
        let mut v = vec![0usize; 1001];
        let s = SharedMut::new(&mut v);
        pool.run(&|ith, nth| {
            for i in split_range(1001, ith, nth) {
                // SAFETY: split_range gives each thread a disjoint range.
                unsafe { s.write(i, i * 2) };
            }
        });
        assert!(v.iter().enumerate().all(|(i, &x)| x == 2 * i));
    }

    /// Workers of every pool skip the calls made while this is set, as if descheduled.
    pub(super) static WORKERS_PAUSED: AtomicBool = AtomicBool::new(false);

    /// Regression guard for the fork-join wait: a call must not wait for a worker that does
    /// not start (descheduled, another process on its core); the caller runs the unclaimed
    /// indices itself. (Before, `run` waited for every worker: on a 2-core machine with the
    /// other core busy, decoding fell from ~127 to ~6 tokens/s.)
    #[test]
    fn a_call_does_not_wait_for_a_worker_that_does_not_start() {
        let pool = ThreadPool::new(3);
        WORKERS_PAUSED.store(true, Ordering::SeqCst);
        let by_caller = [const { AtomicUsize::new(0) }; 3];
        let caller = std::thread::current().id();
        pool.run(&|ith, nth| {
            assert_eq!(nth, 3);
            if std::thread::current().id() == caller {
                by_caller[ith].fetch_add(1, Ordering::Relaxed);
            }
        });
        WORKERS_PAUSED.store(false, Ordering::SeqCst);
        assert!(by_caller.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        // and the workers take part again afterwards
        let hits = [const { AtomicUsize::new(0) }; 3];
        for _ in 0..100 {
            pool.run(&|ith, _| {
                hits[ith].fetch_add(1, Ordering::Relaxed);
            });
        }
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 100));
    }

    #[test]
    fn worker_panic_is_reported_not_hung() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|ith, _| {
                if ith == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        pool.run(&|_, _| {});
    }
}
