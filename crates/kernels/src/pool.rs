//! A small fork-join thread pool for the forward pass.
//!
//! Workers are spawned once. `run(f)` hands `f(ith, nth)` to every worker, runs `f(0, nth)`
//! on the caller and returns when all are done: no allocation and no thread spawn per call.
//! Idle workers spin briefly (a decode step issues hundreds of small jobs back to back), then
//! sleep on a condition variable so an idle server burns no CPU.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// Spin iterations before a worker goes to sleep (roughly 50-100 µs).
const SPIN_LIMIT: u32 = 1 << 14;

struct Shared {
    /// Points at a `Job` on the stack of the thread inside `run`; valid while `pending > 0`.
    job: AtomicPtr<()>,
    epoch: AtomicUsize,
    pending: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Workers asleep on `wake` (changed under `lock`), so `run` skips the wake-up system
    /// call while everyone is spinning, as in a decode step.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
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
    /// A pool of `n_threads` (the caller counts as one; `n_threads - 1` are spawned).
    pub fn new(n_threads: usize) -> ThreadPool {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
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
                    .spawn(move || worker(shared, ith, n_threads))
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

    /// Runs `f(ith, nth)` for every `ith` in `0..nth` in parallel and waits for all.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        if self.n_threads == 1 {
            f(0, 1);
            return;
        }
        let _serial = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let job: Job<'_> = f;
        let sh = &*self.shared;
        sh.job
            .store(&job as *const Job<'_> as *mut (), Ordering::Relaxed);
        sh.pending.store(self.n_threads - 1, Ordering::Relaxed);
        {
            let _g = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.epoch.fetch_add(1, Ordering::Release);
        }
        // a worker that counted itself asleep did so under the lock, before this call's
        // critical section (then it is seen here) or after (then it saw the new epoch)
        if sh.sleepers.load(Ordering::Relaxed) > 0 {
            sh.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0, self.n_threads)));
        let mut spins = 0u32;
        while sh.pending.load(Ordering::Acquire) != 0 {
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

fn worker(shared: Arc<Shared>, ith: usize, nth: usize) {
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
        let ptr = shared.job.load(Ordering::Relaxed) as *const Job<'_>;
        // SAFETY: `run` stored a pointer to a live `Job` before bumping the epoch (Release,
        // observed by our Acquire load) and does not return, so the job stays alive, until
        // `pending` reaches zero, which happens only after this call.
        let job: Job<'_> = unsafe { *ptr };
        if catch_unwind(AssertUnwindSafe(|| job(ith, nth))).is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        shared.pending.fetch_sub(1, Ordering::AcqRel);
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
