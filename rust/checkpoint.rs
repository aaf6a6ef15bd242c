//! An open SQLite checkpoint: one [`Store`] shared by the reads of the caller and the
//! commits of its [`Writer`].
//!
//! One connection serves both, behind a mutex: SQLite connections are not for concurrent
//! use, and a second connection would only wait on the same file lock. The writer holds
//! the mutex only while it commits, never while it waits for rows.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::errors::{Error, Result};
use crate::store::{ItemRow, Store, Synchronous};
use crate::writer::{Limits, Pending, Policy, Weigh, Writer};

type SharedStore = Arc<Mutex<Option<Store>>>;

pub struct Checkpoint {
    path: String,
    store: SharedStore,
    /// None for a checkpoint opened for reading only ([`Checkpoint::open_reader`]).
    writer: Option<Writer<ItemRow>>,
    /// The thread (see [`thread_token`]) inside `with_store` now, or 0. A read can run
    /// Python code with the store locked (an output's `__setstate__` while a load
    /// unpickles); if that code uses the checkpoint again, it must get an error, not
    /// wait forever for the lock its own thread holds.
    reader: AtomicU64,
}

/// A number for the calling thread, unique in the process and never 0.
fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local!(static TOKEN: u64 = NEXT.fetch_add(1, Ordering::Relaxed));
    TOKEN.with(|token| *token)
}

/// Clears `Checkpoint::reader` when a read ends, however it ends.
struct ReaderMark<'a>(&'a AtomicU64);

impl Drop for ReaderMark<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

fn with_store<R>(
    path: &str,
    store: &SharedStore,
    f: impl FnOnce(&mut Store) -> Result<R>,
) -> Result<R> {
    let mut guard: MutexGuard<'_, Option<Store>> =
        store.lock().map_err(|_| Error::poisoned(path))?;
    match guard.as_mut() {
        Some(store) => f(store),
        None => Err(Error::Closed {
            path: path.to_owned(),
        }),
    }
}

impl Weigh for ItemRow {
    /// The bytes a row holds besides its fixed fields: its pickles and texts.
    fn weight(&self) -> usize {
        let len = |blob: &Option<Vec<u8>>| blob.as_ref().map_or(0, Vec::len);
        let text = |text: &Option<String>| text.as_ref().map_or(0, String::len);
        len(&self.input)
            + len(&self.output)
            + text(&self.error_type)
            + text(&self.error)
            + text(&self.traceback)
    }
}

impl Checkpoint {
    pub fn open(path: &Path, synchronous: Synchronous, policy: Policy) -> Result<Self> {
        Self::open_with_limits(path, synchronous, policy, Limits::DEFAULT)
    }

    /// `open` with other bounds on the pending buffer than [`Limits::DEFAULT`] (tests).
    pub fn open_with_limits(
        path: &Path,
        synchronous: Synchronous,
        policy: Policy,
        limits: Limits,
    ) -> Result<Self> {
        let opened = Store::open(path, synchronous)?;
        let name = opened.path().to_owned();
        let store: SharedStore = Arc::new(Mutex::new(Some(opened)));
        let writer = {
            let store = Arc::clone(&store);
            let commit_path = name.clone();
            Writer::start(&name, policy, limits, move |rows: &[ItemRow]| {
                with_store(&commit_path, &store, |store| store.append(rows))
            })?
        };
        Ok(Checkpoint {
            path: name,
            store,
            writer: Some(writer),
            reader: AtomicU64::new(0),
        })
    }

    /// Opens an existing checkpoint for reading only (`Store::open_read_only`): no
    /// writer, nothing written, no lock of the writer's needed. None for a database
    /// never initialized: it has nothing saved.
    pub fn open_reader(path: &Path) -> Result<Option<Self>> {
        let Some(opened) = Store::open_read_only(path)? else {
            return Ok(None);
        };
        Ok(Some(Checkpoint {
            path: opened.path().to_owned(),
            store: Arc::new(Mutex::new(Some(opened))),
            writer: None,
            reader: AtomicU64::new(0),
        }))
    }

    /// The writer, or the error for a write to a checkpoint opened for reading.
    fn writer(&self) -> Result<&Writer<ItemRow>> {
        self.writer.as_ref().ok_or_else(|| Error::Checkpoint {
            path: self.path.clone(),
            detail: "is opened for reading only".to_owned(),
        })
    }

    fn is_forked_copy(&self) -> bool {
        self.writer.as_ref().is_some_and(Writer::is_forked_copy)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Runs a read (or a direct write such as `add_version`) on the open store.
    pub fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> Result<R>) -> Result<R> {
        if let Some(writer) = self
            .writer
            .as_ref()
            .filter(|writer| writer.is_forked_copy())
        {
            return Err(writer.forked());
        }
        let me = thread_token();
        if self.reader.load(Ordering::Acquire) == me {
            return Err(Error::Checkpoint {
                path: self.path.clone(),
                detail: "used again by code that runs while it is being read (an output's \
                         __setstate__ or __reduce__?); use it after the read returns"
                    .to_owned(),
            });
        }
        with_store(&self.path, &self.store, |store| {
            self.reader.store(me, Ordering::Release);
            let _mark = ReaderMark(&self.reader);
            f(store)
        })
    }

    /// Buffers `row`; on [`Pending::Full`] the caller must `wait_for_room` (without
    /// the GIL) before it records again.
    pub fn record(&self, row: ItemRow) -> Result<Pending> {
        self.writer()?.record(row)
    }

    /// Returns once the pending buffer has room again (see [`Writer::wait_for_room`]).
    pub fn wait_for_room(&self) -> Result<()> {
        self.writer()?.wait_for_room()
    }

    /// Fails as `record` would (writer failure, closed, forked), without a row.
    pub fn check_writer(&self) -> Result<()> {
        self.writer()?.check()
    }

    /// Returns once every recorded row is committed (at once for a reader).
    pub fn flush(&self) -> Result<()> {
        self.writer.as_ref().map_or(Ok(()), Writer::flush)
    }

    /// Rows recorded but not yet committed (none for a reader).
    pub fn unsaved(&self) -> Result<u64> {
        self.writer.as_ref().map_or(Ok(0), Writer::unsaved)
    }

    /// Commits what is pending, stops the writer and closes the file. Idempotent. The
    /// file is released even when the writer failed; that failure is then raised.
    pub fn close(&self) -> Result<()> {
        // First, before any lock: a lock held at the fork by a thread of the parent (the
        // writer's, mid-commit, or one inside `close`) stays held in a child, where that
        // thread does not exist to let go.
        if let Some(writer) = self
            .writer
            .as_ref()
            .filter(|writer| writer.is_forked_copy())
        {
            return Err(writer.forked());
        }
        let stopped = self.writer.as_ref().map_or(Ok(()), Writer::close);
        // A lock poisoned by a panic (in a commit, say: the writer's failure then says
        // so) still yields the store: it is only closed, and closing rolls back
        // whatever the panic left half done. Refusing would keep the file open and
        // hide the writer's failure behind this one.
        let store = self
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let closed = store.map_or(Ok(()), Store::close);
        stopped.and(closed)
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        // In a forked child the connection is the parent's: SQLite must not be called
        // on it here (closing could checkpoint the parent's WAL), so it is leaked.
        // No lock is taken: the parent's writer may have held it at the fork, and its
        // thread does not exist here to let go. Leaking one reference keeps the Store
        // from ever being dropped in the child.
        if self.is_forked_copy() {
            std::mem::forget(Arc::clone(&self.store));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{row, TempDir};
    use std::time::Duration;

    #[test]
    fn recorded_rows_are_readable_after_flush() {
        let dir = TempDir::new();
        let policy = Policy {
            batch_size: 1,
            max_wait: Some(Duration::from_millis(10)),
        };
        let checkpoint =
            Checkpoint::open(&dir.file("run.db"), Synchronous::Normal, policy).unwrap();
        let version = checkpoint
            .with_store(|store| store.add_version("fp", "{}", None))
            .unwrap();
        for key in 0..50 {
            let _ = checkpoint
                .record(row(key, version, 0, Some(&[key])))
                .unwrap();
        }
        checkpoint.flush().unwrap();
        let ok = checkpoint
            .with_store(|store| store.key_set(Some(version), 0))
            .unwrap();
        assert_eq!(ok.len(), 50);
        checkpoint.close().unwrap();
        checkpoint.close().unwrap();
        assert!(matches!(
            checkpoint.with_store(|store| store.versions()),
            Err(Error::Closed { .. })
        ));
    }

    #[test]
    fn a_failing_commit_surfaces_as_writer_error() {
        let dir = TempDir::new();
        let path = dir.file("run.db");
        let policy = Policy {
            batch_size: 1,
            max_wait: None,
        };
        let checkpoint = Checkpoint::open(&path, Synchronous::Full, policy).unwrap();
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("DROP TABLE items")
            .unwrap();
        let _ = checkpoint.record(row(1, 1, 0, Some(b"x"))).unwrap();
        match checkpoint.flush() {
            Err(Error::Writer { path: named, cause }) => {
                assert_eq!(named, path.to_string_lossy());
                assert!(cause.to_string().contains("no such table"), "{cause}");
            }
            other => panic!("expected a writer error, got {other:?}"),
        }
        assert!(matches!(checkpoint.close(), Err(Error::Writer { .. })));
        checkpoint.close().unwrap();
    }

    #[test]
    fn close_after_a_panic_with_the_store_locked_releases_the_file_and_raises() {
        let dir = TempDir::new();
        let path = dir.file("run.db");
        let policy = Policy {
            batch_size: 1,
            max_wait: None,
        };
        let checkpoint = Checkpoint::open(&path, Synchronous::Normal, policy).unwrap();
        let version = checkpoint
            .with_store(|store| store.add_version("fp", "{}", None))
            .unwrap();
        // As a panicking commit would: the store's lock is poisoned.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            checkpoint.with_store(|_| -> Result<()> { panic!("a bug") })
        }));
        assert!(panicked.is_err());
        let _ = checkpoint.record(row(1, version, 0, Some(b"x"))).unwrap();
        assert!(matches!(checkpoint.flush(), Err(Error::Writer { .. })));
        let wal = dir.file("run.db-wal");
        assert!(wal.exists());
        assert!(matches!(checkpoint.close(), Err(Error::Writer { .. })));
        // The last connection to a WAL database removes the WAL file as it closes.
        assert!(!wal.exists());
        checkpoint.close().unwrap();
    }

    #[test]
    fn a_lagging_disk_bounds_the_pending_rows() {
        // Another connection holds the write lock: the writer's first commit waits on
        // it (busy timeout), and the caller must wait once the buffer is full again.
        let dir = TempDir::new();
        let path = dir.file("run.db");
        let policy = Policy {
            batch_size: 1,
            max_wait: None,
        };
        let limits = Limits {
            rows: 5,
            bytes: usize::MAX,
        };
        let checkpoint =
            Checkpoint::open_with_limits(&path, Synchronous::Normal, policy, limits).unwrap();
        let version = checkpoint
            .with_store(|store| store.add_version("fp", "{}", None))
            .unwrap();
        let blocker = rusqlite::Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let recorded = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for key in 0..40 {
                    if checkpoint
                        .record(row(key, version, 0, Some(&[key])))
                        .unwrap()
                        == Pending::Full
                    {
                        checkpoint.wait_for_room().unwrap();
                    }
                    recorded.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
            std::thread::sleep(Duration::from_millis(300));
            // The writer took at most one full buffer before it blocked; 5 more wait.
            let stuck = recorded.load(std::sync::atomic::Ordering::SeqCst);
            assert!((5..=10).contains(&stuck), "{stuck} rows recorded");
            blocker.execute_batch("COMMIT").unwrap();
        });
        checkpoint.flush().unwrap();
        let ok = checkpoint
            .with_store(|store| store.key_set(Some(version), 0))
            .unwrap();
        assert_eq!(ok.len(), 40);
        checkpoint.close().unwrap();
    }
}
