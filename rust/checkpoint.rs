//! An open SQLite checkpoint: one [`Store`] shared by the reads of the caller and the
//! commits of its [`Writer`].
//!
//! One connection serves both, behind a mutex: SQLite connections are not for concurrent
//! use, and a second connection would only wait on the same file lock. The writer holds
//! the mutex only while it commits, never while it waits for rows.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::errors::{Error, Result};
use crate::store::{ItemRow, Store, Synchronous};
use crate::writer::{Policy, Writer};

type SharedStore = Arc<Mutex<Option<Store>>>;

pub struct Checkpoint {
    path: String,
    store: SharedStore,
    writer: Writer<ItemRow>,
}

fn with_store<R>(
    path: &str,
    store: &SharedStore,
    f: impl FnOnce(&mut Store) -> Result<R>,
) -> Result<R> {
    let mut guard: MutexGuard<'_, Option<Store>> = store.lock().map_err(|_| Error::Checkpoint {
        path: path.to_owned(),
        detail: "internal state was left inconsistent by an earlier panic".to_owned(),
    })?;
    match guard.as_mut() {
        Some(store) => f(store),
        None => Err(Error::Closed {
            path: path.to_owned(),
        }),
    }
}

impl Checkpoint {
    pub fn open(path: &Path, synchronous: Synchronous, policy: Policy) -> Result<Self> {
        let opened = Store::open(path, synchronous)?;
        let name = opened.path().to_owned();
        let store: SharedStore = Arc::new(Mutex::new(Some(opened)));
        let writer = {
            let store = Arc::clone(&store);
            let commit_path = name.clone();
            Writer::start(&name, policy, move |rows: &[ItemRow]| {
                with_store(&commit_path, &store, |store| store.append(rows))
            })?
        };
        Ok(Checkpoint {
            path: name,
            store,
            writer,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Runs a read (or a direct write such as `add_version`) on the open store.
    pub fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> Result<R>) -> Result<R> {
        if self.writer.is_forked_copy() {
            return Err(self.writer.forked());
        }
        with_store(&self.path, &self.store, f)
    }

    pub fn record(&self, row: ItemRow) -> Result<()> {
        self.writer.record(row)
    }

    /// Fails as `record` would (writer failure, closed, forked), without a row.
    pub fn check_writer(&self) -> Result<()> {
        self.writer.check()
    }

    pub fn flush(&self) -> Result<()> {
        self.writer.flush()
    }

    /// Commits what is pending, stops the writer and closes the file. Idempotent. The
    /// file is released even when the writer failed; that failure is then raised.
    pub fn close(&self) -> Result<()> {
        let stopped = self.writer.close();
        if let Err(Error::Forked { .. }) = stopped {
            return stopped;
        }
        let store = self
            .store
            .lock()
            .map_err(|_| Error::Checkpoint {
                path: self.path.clone(),
                detail: "internal state was left inconsistent by an earlier panic".to_owned(),
            })?
            .take();
        let closed = store.map_or(Ok(()), Store::close);
        stopped.and(closed)
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        // In a forked child the connection is the parent's: SQLite must not be called
        // on it here (closing could checkpoint the parent's WAL), so it is leaked.
        if self.writer.is_forked_copy() {
            let store = match self.store.lock() {
                Ok(mut store) => store.take(),
                Err(poisoned) => poisoned.into_inner().take(),
            };
            std::mem::forget(store);
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
            checkpoint
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
        checkpoint.record(row(1, 1, 0, Some(b"x"))).unwrap();
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
}
