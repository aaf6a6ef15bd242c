//! The pending buffer and its background writer (DESIGN 7): group commit.
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

struct State<T> {
    pending: Vec<T>,
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
    /// The writer's failure; once set the writer has stopped and nothing more is saved.
    failure: Option<Error>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Wakes the writer: rows arrived, a flush or close was asked for.
    work: Condvar,
    /// Wakes flushers: a commit finished or the writer stopped.
    progress: Condvar,
}

pub struct Writer<T> {
    path: String,
    policy: Policy,
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

/// A panic while the lock was held cannot come from user input, but if it happens it
/// must surface as an error, not as a second panic.
fn poisoned(path: &str) -> Error {
    Error::Checkpoint {
        path: path.to_owned(),
        detail: "internal state was left inconsistent by an earlier panic".to_owned(),
    }
}

fn lock<'a, T>(path: &str, mutex: &'a Mutex<T>) -> Result<MutexGuard<'a, T>> {
    mutex.lock().map_err(|_| poisoned(path))
}

impl<T: Send + 'static> Writer<T> {
    /// Starts the writer thread; `commit` saves one batch, all of it or none.
    pub fn start<C>(path: &str, policy: Policy, commit: C) -> Result<Self>
    where
        C: FnMut(&[T]) -> Result<()> + Send + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: Vec::new(),
                oldest: None,
                recorded: 0,
                committed: 0,
                flush_upto: 0,
                closing: false,
                writer_running: true,
                writer_idle: false,
                flushers: 0,
                failure: None,
            }),
            work: Condvar::new(),
            progress: Condvar::new(),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("snapperable-writer".to_owned())
                .spawn(move || run(&shared, policy, commit))
                .map_err(|err| Error::Checkpoint {
                    path: path.to_owned(),
                    detail: format!("cannot start the writer thread: {err}"),
                })?
        };
        Ok(Writer {
            path: path.to_owned(),
            policy,
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
    pub fn record(&self, row: T) -> Result<()> {
        let mut state = self.state()?;
        self.check_failure(&state)?;
        if state.closing {
            return Err(Error::Closed {
                path: self.path.clone(),
            });
        }
        state.pending.push(row);
        state.recorded += 1;
        let len = state.pending.len();
        // The first pending row starts the `max_wait` clock (read only under that
        // policy: the clock costs a call per batch).
        if len == 1 && self.policy.max_wait.is_some() {
            state.oldest = Some(Instant::now());
        }
        // The first row and a full batch are what the writer decides on; between the two
        // it has nothing to do, and while it commits it looks at `pending` again anyway.
        if state.writer_idle && (len == 1 || len >= self.policy.batch_size) {
            state.writer_idle = false;
            self.shared.work.notify_one();
        }
        Ok(())
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
                .map_err(|_| poisoned(&self.path))?;
        };
        state.flushers -= 1;
        outcome
    }

    /// Commits what is pending, stops the writer and waits for it. Idempotent: the first
    /// call raises the writer's failure, if any (as `record` and `flush` do), later ones
    /// return quietly.
    pub fn close(&self) -> Result<()> {
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
        thread.join().map_err(|_| Error::Checkpoint {
            path: self.path.clone(),
            detail: "the writer thread panicked".to_owned(),
        })?;
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

/// The writer thread: wait until a commit is due, commit everything pending, repeat.
///
/// Its own waits recover a poisoned lock instead of returning: the state it guards is
/// only counters and a buffer, and a writer that vanished would leave flushers waiting.
fn run<T, C>(shared: &Shared<T>, policy: Policy, mut commit: C)
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
        state.oldest = None;
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
    state.writer_running = false;
    shared.progress.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::sleep;

    type Batches = Arc<Mutex<Vec<Vec<u32>>>>;

    /// A writer whose commits take `commit_time` and are logged; commits fail from the
    /// `fail_from`-th one on (counting from 0).
    fn logging_writer(
        policy: Policy,
        commit_time: Duration,
        fail_from: usize,
    ) -> (Writer<u32>, Batches) {
        let batches: Batches = Arc::default();
        let log = Arc::clone(&batches);
        let writer = Writer::start("test.db", policy, move |rows: &[u32]| {
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
        writer.record(0).unwrap();
        sleep(Duration::from_millis(30)); // the writer is now inside the first commit
        for i in 1..=500 {
            writer.record(i).unwrap();
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
            writer.record(i).unwrap();
        }
        sleep(Duration::from_millis(50));
        assert!(batches.lock().unwrap().is_empty());
        writer.record(9).unwrap();
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
        writer.record(7).unwrap();
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
            writer.record(i).unwrap();
        }
        writer.close().unwrap();
        writer.close().unwrap();
        assert_eq!(batches.lock().unwrap().concat(), vec![0, 1, 2, 3, 4]);
        assert!(matches!(writer.record(5), Err(Error::Closed { .. })));
    }

    #[test]
    fn a_failure_is_raised_by_the_next_call_and_by_every_later_one() {
        let (writer, _) = logging_writer(EAGER, Duration::ZERO, 1);
        writer.record(0).unwrap();
        writer.flush().unwrap();
        writer.record(1).unwrap();
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
        writer.record(0).unwrap();
        assert!(matches!(writer.close(), Err(Error::Writer { .. })));
        writer.close().unwrap();
    }
}
