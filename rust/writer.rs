//! The pending buffer and its background writer (docs/architecture.md 7): group commit.
//!
//! `record` only appends to a buffer under a mutex, so the caller's loop never waits for
//! the disk. One writer thread commits *everything* pending in one transaction whenever a
//! commit is due (enough rows, the oldest row waited long enough, or a flush/close asked
//! for it); rows recorded while it commits go into the next commit. The cost of a commit
//! (an fsync under `synchronous=FULL`) is thus shared by every row that arrived during
//! the previous one, even with `batch_size=1`.
//!
//! Generic over the row type and the commit function, so it is tested without SQLite.

use std::mem;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::errors::{Error, Result};

/// When a commit is due.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Pending rows that start a commit (at least 1).
    pub batch_size: usize,
    /// The longest a row may stay pending; `None`: until `batch_size` or a flush.
    pub max_wait: Option<Duration>,
}

/// A batch buffer of more rows than this is not kept for reuse: one huge flush must not
/// pin its memory for the rest of the run.
const SPARE_CAPACITY: usize = 1 << 16;

/// How much may wait for the writer. Once pending rows reach either bound, `record`
/// reports the buffer full and the caller waits (`wait_for_room`) until the writer has
/// taken the batch; the writer commits a full buffer whatever `batch_size` says.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Pending rows (at least 1).
    pub rows: usize,
    /// Pending payload bytes, as [`Weigh`] counts them (at least 1).
    pub bytes: usize,
}

impl Limits {
    /// Without a bound, a writer that lags (a slow disk, big outputs) lets the buffer
    /// grow with the run: memory, and what a crash loses, with it.
    ///
    /// 16,384 rows: the pure-Python writer's bound (`_writer.MAX_PENDING_ROWS`). A
    /// commit of that many small rows is long enough (~10 ms) to make its fsync cheap
    /// per row, and the buffer stays a few MB; a lagging writer is the bottleneck
    /// either way, so waiting for it costs the loop nothing end to end.
    /// 64 MiB of outputs: the row count alone would allow gigabytes of large outputs
    /// (16,384 x 1 MB pickles); this keeps at most ~128 MiB in flight (one batch being
    /// committed, one pending) however large the outputs.
    pub const DEFAULT: Limits = Limits {
        rows: 16_384,
        bytes: 64 << 20,
    };

    fn full(self, rows: usize, bytes: usize) -> bool {
        rows >= self.rows || bytes >= self.bytes
    }
}

/// The payload size of a pending row, counted against [`Limits::bytes`].
pub trait Weigh {
    fn weight(&self) -> usize;
}

/// What `record` leaves behind.
#[must_use = "a full buffer must be waited on (`wait_for_room`) before the next record"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// Below the limits: record on.
    Room,
    /// At a limit: call `wait_for_room` (without the GIL) before recording more.
    Full,
}

struct State<T> {
    pending: Vec<T>,
    /// The total [`Weigh::weight`] of `pending`.
    pending_bytes: usize,
    /// When the oldest pending row arrived; kept only under a `max_wait` policy.
    oldest: Option<Instant>,
    /// Rows recorded since the start, and rows committed; a flush waits for the second
    /// to reach the first as it was when the flush began.
    recorded: u64,
    committed: u64,
    /// Commit now, whatever the policy says, until `committed` reaches this.
    flush_upto: u64,
    closing: bool,
    writer_running: bool,
    /// The writer is blocked on `work` and only a notify will make it look again.
    /// Notifying costs a futex syscall even when nobody waits, so `record` (called per
    /// item) notifies only when this is set, and clears it so one wake-up is sent once.
    writer_idle: bool,
    /// Threads blocked in `flush`: the writer signals `progress` only if there are any.
    flushers: usize,
    /// Threads blocked in `wait_for_room`: the writer signals `room` only if any.
    room_waiters: usize,
    /// The writer's failure; once set the writer has stopped and nothing more is saved.
    failure: Option<Error>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Wakes the writer: rows arrived, a flush or close was asked for.
    work: Condvar,
    /// Wakes flushers: a commit finished or the writer stopped.
    progress: Condvar,
    /// Wakes callers waiting for room: the writer took the pending rows, or stopped.
    room: Condvar,
}

pub struct Writer<T> {
    path: String,
    policy: Policy,
    limits: Limits,
    /// The process that started the thread, and the fork count at the time. After a
    /// fork the child has the buffer but not the thread: it must neither wait for it
    /// nor join it.
    owner_pid: u32,
    owner_forks: u64,
    shared: Arc<Shared<T>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Forks of this process so far, counted by a `pthread_atfork` child hook; `None` if the
/// hook could not be installed.
fn fork_count() -> Option<u64> {
    static FORKS: AtomicU64 = AtomicU64::new(0);
    static HOOKED: AtomicBool = AtomicBool::new(false);
    static INSTALL: Once = Once::new();

    extern "C" fn count_fork() {
        // Runs in the child right after fork: an atomic add is all it may safely do.
        FORKS.fetch_add(1, Ordering::Relaxed);
    }

    INSTALL.call_once(|| {
        #[cfg(unix)]
        {
            // SAFETY: `count_fork` is a plain `extern "C" fn` with no captured state,
            // valid for the life of the process; the hook is installed once.
            let status = unsafe { libc::pthread_atfork(None, None, Some(count_fork)) };
            HOOKED.store(status == 0, Ordering::Relaxed);
        }
        #[cfg(not(unix))]
        HOOKED.store(true, Ordering::Relaxed); // no fork: the count stays 0
    });
    HOOKED
        .load(Ordering::Relaxed)
        .then(|| FORKS.load(Ordering::Relaxed))
}

/// The fork count to compare against later (0 if the hook is missing; unused then).
fn forks_so_far() -> u64 {
    fork_count().unwrap_or(0)
}

fn lock<'a, T>(path: &str, mutex: &'a Mutex<T>) -> Result<MutexGuard<'a, T>> {
    mutex.lock().map_err(|_| Error::poisoned(path))
}

impl<T: Weigh + Send + 'static> Writer<T> {
    /// Starts the writer thread; `commit` saves one batch, all of it or none.
    pub fn start<C>(path: &str, policy: Policy, limits: Limits, commit: C) -> Result<Self>
    where
        C: FnMut(&[T]) -> Result<()> + Send + 'static,
    {
        let limits = Limits {
            rows: limits.rows.max(1),
            bytes: limits.bytes.max(1),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: Vec::new(),
                pending_bytes: 0,
                oldest: None,
                recorded: 0,
                committed: 0,
                flush_upto: 0,
                closing: false,
                writer_running: true,
                writer_idle: false,
                flushers: 0,
                room_waiters: 0,
                failure: None,
            }),
            work: Condvar::new(),
            progress: Condvar::new(),
            room: Condvar::new(),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            let thread_path = path.to_owned();
            std::thread::Builder::new()
                .name("snapperable-writer".to_owned())
                .spawn(move || {
                    // A panic (in a commit or in the loop) must not end the thread
                    // silently: flushers, callers waiting for room and `close` would
                    // wait forever for a writer that is gone. It becomes the writer's
                    // failure instead, raised by every later call like any other.
                    let ran = panic::catch_unwind(AssertUnwindSafe(|| {
                        run(&shared, policy, limits, commit);
                    }));
                    let failure = ran
                        .err()
                        .map(|payload| Error::panicked(&thread_path, "writer", &*payload));
                    stop(&shared, failure);
                })
                .map_err(|err| Error::Checkpoint {
                    path: path.to_owned(),
                    detail: format!("cannot start the writer thread: {err}"),
                })?
        };
        Ok(Writer {
            path: path.to_owned(),
            policy,
            limits,
            owner_pid: std::process::id(),
            owner_forks: forks_so_far(),
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The shared state, to the process that owns the writer only.
    fn state(&self) -> Result<MutexGuard<'_, State<T>>> {
        if self.is_forked_copy() {
            return Err(self.forked());
        }
        lock(&self.path, &self.shared.state)
    }

    /// The writer's failure as the error to raise, if it has failed.
    fn check_failure(&self, state: &State<T>) -> Result<()> {
        match &state.failure {
            Some(failure) => Err(Error::Writer {
                path: self.path.clone(),
                cause: Box::new(failure.clone()),
            }),
            None => Ok(()),
        }
    }

    /// Whether `record` would accept a row now: the writer's failure, or the closed
    /// checkpoint, as `record` would raise it.
    pub fn check(&self) -> Result<()> {
        let state = self.state()?;
        self.check_failure(&state)?;
        if state.closing {
            return Err(Error::Closed {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Buffers `row` for the writer. Raises the writer's failure instead, if it failed:
    /// the row could never be saved.
    ///
    /// Never blocks on the writer (it may be called with the GIL held): when the row
    /// fills the buffer it returns [`Pending::Full`], and the caller must call
    /// [`Writer::wait_for_room`], without the GIL, before it records again.
    pub fn record(&self, row: T) -> Result<Pending> {
        let weight = row.weight();
        let mut state = self.state()?;
        self.check_failure(&state)?;
        if state.closing {
            return Err(Error::Closed {
                path: self.path.clone(),
            });
        }
        state.pending.push(row);
        state.pending_bytes = state.pending_bytes.saturating_add(weight);
        state.recorded += 1;
        let len = state.pending.len();
        let full = self.limits.full(len, state.pending_bytes);
        // The first pending row starts the `max_wait` clock (read only under that
        // policy: the clock costs a call per batch).
        if len == 1 && self.policy.max_wait.is_some() {
            state.oldest = Some(Instant::now());
        }
        // The first row and a full batch are what the writer decides on; between the two
        // it has nothing to do, and while it commits it looks at `pending` again anyway.
        if state.writer_idle && (len == 1 || len >= self.policy.batch_size || full) {
            state.writer_idle = false;
            self.shared.work.notify_one();
        }
        Ok(if full { Pending::Full } else { Pending::Room })
    }

    /// Returns once the pending rows are below the limits again: the writer has taken
    /// the full buffer (to commit it), or it stopped. Raises the writer's failure.
    pub fn wait_for_room(&self) -> Result<()> {
        let mut state = self.state()?;
        state.room_waiters += 1;
        let outcome = loop {
            if let Err(failure) = self.check_failure(&state) {
                break Err(failure);
            }
            // A writer that stopped without failing was closed after committing all.
            if !state.writer_running || !self.limits.full(state.pending.len(), state.pending_bytes)
            {
                break Ok(());
            }
            // A full buffer is due whatever the policy: make sure the writer looks.
            if state.writer_idle {
                state.writer_idle = false;
                self.shared.work.notify_one();
            }
            state = self
                .shared
                .room
                .wait(state)
                .map_err(|_| Error::poisoned(&self.path))?;
        };
        state.room_waiters -= 1;
        outcome
    }

    /// `record`, then `wait_for_room` if the buffer is full: for callers that may block.
    pub fn record_blocking(&self, row: T) -> Result<()> {
        match self.record(row)? {
            Pending::Room => Ok(()),
            Pending::Full => self.wait_for_room(),
        }
    }

    /// Rows recorded but not yet committed.
    pub fn unsaved(&self) -> Result<u64> {
        let state = self.state()?;
        Ok(state.recorded - state.committed)
    }

    /// Returns once every row recorded before the call is committed.
    pub fn flush(&self) -> Result<()> {
        let mut state = self.state()?;
        self.check_failure(&state)?;
        let target = state.recorded;
        if state.committed >= target {
            return Ok(());
        }
        state.flush_upto = state.flush_upto.max(target);
        state.writer_idle = false;
        self.shared.work.notify_one();
        state.flushers += 1;
        let outcome = loop {
            if state.committed >= target {
                break Ok(());
            }
            if let Err(failure) = self.check_failure(&state) {
                break Err(failure);
            }
            if !state.writer_running {
                break Err(Error::Closed {
                    path: self.path.clone(),
                });
            }
            state = self
                .shared
                .progress
                .wait(state)
                .map_err(|_| Error::poisoned(&self.path))?;
        };
        state.flushers -= 1;
        outcome
    }

    /// Commits what is pending, stops the writer and waits for it. Idempotent: the first
    /// call raises the writer's failure, if any (as `record` and `flush` do), later ones
    /// return quietly.
    pub fn close(&self) -> Result<()> {
        // Before any lock: in a forked child, a parent thread may have held one at the
        // fork (another `close`, joining the writer), and it does not exist here to let go.
        if self.is_forked_copy() {
            return Err(self.forked());
        }
        let mut thread = lock(&self.path, &self.thread)?;
        if thread.is_none() {
            return Ok(());
        }
        {
            let mut state = self.state()?;
            state.closing = true;
            state.writer_idle = false;
            self.shared.work.notify_one();
        }
        let Some(thread) = thread.take() else {
            return Ok(());
        };
        thread
            .join()
            .map_err(|payload| Error::panicked(&self.path, "writer", &*payload))?;
        let state = self.state()?;
        self.check_failure(&state)
    }
}

impl<T> Writer<T> {
    pub fn is_forked_copy(&self) -> bool {
        // Checked on every call, `record` included: an atomic load, where asking the OS
        // for the pid is a syscall. Without the fork hook, fall back to the pid.
        match fork_count() {
            Some(forks) => forks != self.owner_forks,
            None => std::process::id() != self.owner_pid,
        }
    }

    /// The error for any use of the writer in a forked child.
    pub fn forked(&self) -> Error {
        Error::Forked {
            path: self.path.clone(),
            owner: self.owner_pid,
        }
    }
}

impl<T> Drop for Writer<T> {
    fn drop(&mut self) {
        // Nothing can be raised from here; an explicit `close()` is how callers learn of
        // failures. Still save what is pending and do not leave the thread behind.
        let thread = match self.thread.get_mut() {
            Ok(thread) => thread.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if self.is_forked_copy() {
            // The thread lives only in the parent; joining its handle here would hang.
            std::mem::forget(thread);
            return;
        }
        if let Some(thread) = thread {
            if let Ok(mut state) = self.shared.state.lock() {
                state.closing = true;
                state.writer_idle = false;
                self.shared.work.notify_one();
            }
            let _ = thread.join();
        }
    }
}

/// The writer thread: wait until a commit is due, commit everything pending, repeat,
/// until closed or failed. [`stop`] then tells the waiters.
///
/// Its own waits recover a poisoned lock instead of returning: the state it guards is
/// only counters and a buffer, and a writer that vanished would leave flushers waiting.
fn run<T, C>(shared: &Shared<T>, policy: Policy, limits: Limits, mut commit: C)
where
    C: FnMut(&[T]) -> Result<()>,
{
    // The buffer of the last batch, emptied, handed back to `record` at the next take:
    // rows then go into memory already allocated instead of a growing fresh `Vec`.
    let mut spare: Vec<T> = Vec::new();
    let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if state.failure.is_some() {
            break;
        }
        if state.pending.is_empty() {
            if state.closing {
                break;
            }
            state.writer_idle = true;
            state = shared
                .work
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.writer_idle = false;
            continue;
        }
        let due_in = match (policy.max_wait, state.oldest) {
            (Some(max_wait), Some(oldest)) => Some(max_wait.saturating_sub(oldest.elapsed())),
            _ => None,
        };
        let due = state.closing
            || state.pending.len() >= policy.batch_size
            || limits.full(state.pending.len(), state.pending_bytes)
            || state.flush_upto > state.committed
            || due_in == Some(Duration::ZERO);
        if !due {
            state.writer_idle = true;
            state = match due_in {
                Some(timeout) => {
                    let waited = shared.work.wait_timeout(state, timeout);
                    waited.unwrap_or_else(PoisonError::into_inner).0
                }
                None => shared
                    .work
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
            };
            state.writer_idle = false;
            continue;
        }
        let mut batch = mem::replace(&mut state.pending, mem::take(&mut spare));
        state.pending_bytes = 0;
        state.oldest = None;
        if state.room_waiters > 0 {
            shared.room.notify_all();
        }
        drop(state);
        let result = commit(&batch);
        let committed = batch.len() as u64;
        // Rows (and their blobs) are freed here, outside the lock.
        batch.clear();
        if batch.capacity() <= SPARE_CAPACITY {
            spare = batch;
        }
        state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(()) => state.committed += committed,
            Err(err) => state.failure = Some(err),
        }
        if state.flushers > 0 {
            shared.progress.notify_all();
        }
    }
}

/// Marks the writer stopped, with `panicked` (the failure for a panic of `run`, if it
/// panicked) as its failure unless it had one, and wakes everyone waiting for it.
fn stop<T>(shared: &Shared<T>, panicked: Option<Error>) {
    let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
    if state.failure.is_none() {
        state.failure = panicked;
    }
    state.writer_running = false;
    // A panic with the lock held poisoned it. Every call checks `failure` first thing
    // after locking, and the writer is gone, so nothing reads the rest of the state
    // again: callers should get the failure (a `WriterError`), not a poisoned lock.
    shared.state.clear_poison();
    shared.progress.notify_all();
    shared.room.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::sleep;

    type Batches = Arc<Mutex<Vec<Vec<u32>>>>;
    /// Commits wait until this is set to true.
    type Gate = Arc<(Mutex<bool>, Condvar)>;

    impl Weigh for u32 {
        /// A test row weighs its value, so tests choose the bytes they record.
        fn weight(&self) -> usize {
            *self as usize
        }
    }

    /// A writer whose commits take `commit_time` and are logged; commits fail from the
    /// `fail_from`-th one on (counting from 0).
    fn logging_writer(
        policy: Policy,
        commit_time: Duration,
        fail_from: usize,
    ) -> (Writer<u32>, Batches) {
        let batches: Batches = Arc::default();
        let log = Arc::clone(&batches);
        let writer = Writer::start("test.db", policy, Limits::DEFAULT, move |rows: &[u32]| {
            sleep(commit_time);
            let mut log = log.lock().unwrap();
            if log.len() >= fail_from {
                return Err(Error::Checkpoint {
                    path: "test.db".into(),
                    detail: "disk full".into(),
                });
            }
            log.push(rows.to_vec());
            Ok(())
        })
        .unwrap();
        (writer, batches)
    }

    const EAGER: Policy = Policy {
        batch_size: 1,
        max_wait: None,
    };

    #[test]
    fn rows_arriving_during_a_commit_share_the_next_one() {
        let (writer, batches) = logging_writer(EAGER, Duration::from_millis(100), usize::MAX);
        writer.record_blocking(0).unwrap();
        sleep(Duration::from_millis(30)); // the writer is now inside the first commit
        for i in 1..=500 {
            writer.record_blocking(i).unwrap();
        }
        writer.flush().unwrap();
        let batches = batches.lock().unwrap().clone();
        assert_eq!(batches, vec![vec![0], (1..=500).collect::<Vec<_>>()]);
        writer.close().unwrap();
    }

    #[test]
    fn batch_size_starts_a_commit_without_flush() {
        let policy = Policy {
            batch_size: 10,
            max_wait: None,
        };
        let (writer, batches) = logging_writer(policy, Duration::ZERO, usize::MAX);
        for i in 0..9 {
            writer.record_blocking(i).unwrap();
        }
        sleep(Duration::from_millis(50));
        assert!(batches.lock().unwrap().is_empty());
        writer.record_blocking(9).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while batches.lock().unwrap().is_empty() && Instant::now() < deadline {
            sleep(Duration::from_millis(5));
        }
        assert_eq!(
            batches.lock().unwrap().clone(),
            vec![(0..10).collect::<Vec<_>>()]
        );
    }

    #[test]
    fn max_wait_bounds_how_long_a_row_stays_pending() {
        let policy = Policy {
            batch_size: 1000,
            max_wait: Some(Duration::from_millis(20)),
        };
        let (writer, batches) = logging_writer(policy, Duration::ZERO, usize::MAX);
        let recorded = Instant::now();
        writer.record_blocking(7).unwrap();
        while batches.lock().unwrap().is_empty() {
            assert!(
                recorded.elapsed() < Duration::from_secs(5),
                "row never committed"
            );
            sleep(Duration::from_millis(2));
        }
        assert!(recorded.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn close_commits_what_is_pending_and_is_idempotent() {
        let policy = Policy {
            batch_size: 1000,
            max_wait: None,
        };
        let (writer, batches) = logging_writer(policy, Duration::ZERO, usize::MAX);
        for i in 0..5 {
            writer.record_blocking(i).unwrap();
        }
        writer.close().unwrap();
        writer.close().unwrap();
        assert_eq!(batches.lock().unwrap().concat(), vec![0, 1, 2, 3, 4]);
        assert!(matches!(writer.record(5), Err(Error::Closed { .. })));
    }

    #[test]
    fn a_failure_is_raised_by_the_next_call_and_by_every_later_one() {
        let (writer, _) = logging_writer(EAGER, Duration::ZERO, 1);
        writer.record_blocking(0).unwrap();
        writer.flush().unwrap();
        writer.record_blocking(1).unwrap();
        let err = writer.flush().unwrap_err();
        assert!(
            matches!(&err, Error::Writer { cause, .. } if cause.to_string().contains("disk full"))
        );
        assert!(matches!(writer.record(2), Err(Error::Writer { .. })));
        assert!(matches!(writer.close(), Err(Error::Writer { .. })));
        writer.close().unwrap();
    }

    #[test]
    fn close_raises_a_failure_of_its_own_commit() {
        let policy = Policy {
            batch_size: 1000,
            max_wait: None,
        };
        let (writer, _) = logging_writer(policy, Duration::ZERO, 0);
        writer.record_blocking(0).unwrap();
        assert!(matches!(writer.close(), Err(Error::Writer { .. })));
        writer.close().unwrap();
    }

    /// A writer with `limits` whose commits wait until `gate` is opened (set to true).
    fn gated_writer(policy: Policy, limits: Limits, fail: bool) -> (Writer<u32>, Batches, Gate) {
        let batches: Batches = Arc::default();
        let gate: Gate = Arc::default();
        let (log, commit_gate) = (Arc::clone(&batches), Arc::clone(&gate));
        let writer = Writer::start("test.db", policy, limits, move |rows: &[u32]| {
            let (open, opened) = &*commit_gate;
            let mut open = open.lock().unwrap();
            while !*open {
                open = opened.wait(open).unwrap();
            }
            if fail {
                return Err(Error::Checkpoint {
                    path: "test.db".into(),
                    detail: "disk full".into(),
                });
            }
            log.lock().unwrap().push(rows.to_vec());
            Ok(())
        })
        .unwrap();
        (writer, batches, gate)
    }

    fn open_gate(gate: &(Mutex<bool>, Condvar)) {
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    /// Waits until `counter` has not moved for 100 ms, and returns it.
    fn settled(counter: &AtomicU64) -> u64 {
        let mut last = counter.load(Ordering::SeqCst);
        loop {
            sleep(Duration::from_millis(100));
            let now = counter.load(Ordering::SeqCst);
            if now == last {
                return now;
            }
            last = now;
        }
    }

    const NEVER: Policy = Policy {
        batch_size: usize::MAX,
        max_wait: None,
    };

    #[test]
    fn a_full_buffer_makes_the_caller_wait_for_a_lagging_writer() {
        let limits = Limits {
            rows: 8,
            bytes: usize::MAX,
        };
        let (writer, batches, gate) = gated_writer(NEVER, limits, false);
        let writer = Arc::new(writer);
        let recorded = Arc::new(AtomicU64::new(0));
        let recorder = {
            let (writer, recorded) = (Arc::clone(&writer), Arc::clone(&recorded));
            std::thread::spawn(move || {
                for i in 0..100 {
                    writer.record_blocking(i).unwrap();
                    recorded.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        // The writer took rows 0..8 (a full buffer is due whatever batch_size says) and
        // is stuck committing them; rows 8..16 fill the buffer again, and the recorder
        // waits in the call that recorded row 15.
        assert_eq!(settled(&recorded), 15);
        open_gate(&gate);
        recorder.join().unwrap();
        writer.flush().unwrap();
        let batches = batches.lock().unwrap().clone();
        assert!(batches.iter().all(|batch| batch.len() <= 8), "{batches:?}");
        assert_eq!(batches.concat(), (0..100).collect::<Vec<_>>());
        writer.close().unwrap();
    }

    #[test]
    fn record_reports_full_at_the_row_limit_and_at_the_byte_limit() {
        let rows = Limits {
            rows: 3,
            bytes: usize::MAX,
        };
        let (writer, _, gate) = gated_writer(NEVER, rows, false);
        assert_eq!(writer.record(1).unwrap(), Pending::Room);
        assert_eq!(writer.record(1).unwrap(), Pending::Room);
        assert_eq!(writer.record(1).unwrap(), Pending::Full);
        writer.wait_for_room().unwrap(); // the writer took the three rows
        open_gate(&gate);
        writer.close().unwrap();

        let bytes = Limits {
            rows: 1000,
            bytes: 100,
        };
        let (writer, batches, gate) = gated_writer(NEVER, bytes, false);
        open_gate(&gate);
        assert_eq!(writer.record(60).unwrap(), Pending::Room);
        assert_eq!(writer.record(40).unwrap(), Pending::Full); // 100 bytes pending
        writer.wait_for_room().unwrap();
        for _ in 0..20 {
            writer.record_blocking(60).unwrap();
        }
        writer.close().unwrap();
        let batches = batches.lock().unwrap().clone();
        assert!(
            batches.iter().all(|b| b.iter().sum::<u32>() <= 120),
            "{batches:?}"
        );
        assert_eq!(batches.concat().len(), 22);
    }

    #[test]
    fn a_caller_waiting_for_room_gets_the_writers_failure() {
        let limits = Limits {
            rows: 2,
            bytes: usize::MAX,
        };
        let (writer, _, gate) = gated_writer(NEVER, limits, true);
        writer.record_blocking(0).unwrap(); // 1 pending
        writer.record_blocking(1).unwrap(); // full: taken by the writer, which blocks
        let writer = Arc::new(writer);
        let waiter = {
            let writer = Arc::clone(&writer);
            std::thread::spawn(move || {
                writer.record_blocking(2)?;
                writer.record_blocking(3)
            })
        };
        sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished());
        open_gate(&gate); // the commit fails
        assert!(matches!(waiter.join().unwrap(), Err(Error::Writer { .. })));
    }

    /// Runs `call` on a thread of its own and returns its outcome, or fails the test if
    /// it has not returned within a few seconds: a call that hangs is the regression.
    fn within_seconds<R: Send + 'static>(call: impl FnOnce() -> R + Send + 'static) -> R {
        let (sender, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(call());
        });
        outcome
            .recv_timeout(Duration::from_secs(10))
            .expect("the call hung")
    }

    /// A writer whose commits panic once `gate` is opened; `limits` as given.
    fn panicking_writer(limits: Limits) -> (Arc<Writer<u32>>, Gate) {
        let gate: Gate = Arc::default();
        let commit_gate = Arc::clone(&gate);
        let writer = Writer::start("test.db", NEVER, limits, move |_: &[u32]| {
            let (open, opened) = &*commit_gate;
            let mut open = open.lock().unwrap();
            while !*open {
                open = opened.wait(open).unwrap();
            }
            panic!("a bug in the commit");
        })
        .unwrap();
        (Arc::new(writer), gate)
    }

    fn is_panic_failure(outcome: &Result<()>) -> bool {
        matches!(outcome, Err(Error::Writer { cause, .. })
            if cause.to_string().contains("a bug in the commit"))
    }

    #[test]
    fn a_panicking_commit_fails_flush_and_close_instead_of_hanging() {
        let (writer, gate) = panicking_writer(Limits::DEFAULT);
        writer.record_blocking(0).unwrap();
        let flusher = {
            let writer = Arc::clone(&writer);
            std::thread::spawn(move || writer.flush())
        };
        sleep(Duration::from_millis(50)); // the flusher waits for the commit
        open_gate(&gate);
        let flushed = within_seconds(move || flusher.join().unwrap());
        assert!(is_panic_failure(&flushed), "{flushed:?}");
        let later = Arc::clone(&writer);
        let (recorded, flushed, closed) =
            within_seconds(move || (later.record(1), later.flush(), later.close()));
        assert!(
            matches!(recorded, Err(Error::Writer { .. })),
            "{recorded:?}"
        );
        assert!(is_panic_failure(&flushed), "{flushed:?}");
        assert!(is_panic_failure(&closed), "{closed:?}");
        within_seconds(move || writer.close()).unwrap(); // idempotent, as after a failure
    }

    #[test]
    fn a_panicking_commit_wakes_a_caller_waiting_for_room() {
        let limits = Limits {
            rows: 2,
            bytes: usize::MAX,
        };
        let (writer, gate) = panicking_writer(limits);
        writer.record_blocking(0).unwrap();
        writer.record_blocking(1).unwrap(); // full: taken by the writer, which blocks
        let waiter = {
            let writer = Arc::clone(&writer);
            std::thread::spawn(move || {
                writer.record_blocking(2)?;
                writer.record_blocking(3) // full again: waits for room
            })
        };
        sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished());
        open_gate(&gate); // the commit panics
        let waited = within_seconds(move || waiter.join().unwrap());
        assert!(is_panic_failure(&waited), "{waited:?}");
        let closed = within_seconds(move || writer.close());
        assert!(is_panic_failure(&closed), "{closed:?}");
    }
}
