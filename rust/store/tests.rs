//! Helpers shared by the store's tests (and the checkpoint's), and the round trip
//! through every part of the store.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::contract::{KEY_SIZE, STATUS_OK};

/// Rows of `v1` and `v2` interleaved, with failures and superseding rows on both
/// sides of the middle `seq` (where a split scan divides the table).
pub(crate) fn rows_across_the_middle(v1: i64, v2: i64) -> Vec<ItemRow> {
    let keyed = |i: u32, version: i64, status: i64| {
        let mut row = row(0, version, status, (status == 0).then_some(&b"out"[..]));
        row.key[..4].copy_from_slice(&i.to_le_bytes());
        row
    };
    let mut rows = Vec::new();
    for i in 0..4000u32 {
        let status = i64::from(i % 13 == 5); // some failed
        rows.push(keyed(i, v1, status));
        if i % 3 == 0 {
            rows.push(keyed(i, v2, 0)); // another version, interleaved
        }
        if i % 101 == 7 {
            rows.push(keyed(4000 - i, v1, 1 - status)); // supersedes a later key
        }
        if i % 97 == 3 && i > 10 {
            rows.push(keyed(i - 10, v1, 1)); // supersedes an earlier key
        }
    }
    rows
}

/// A store at `run.db` in `dir` with two versions and [`rows_across_the_middle`]:
/// `(path, store, v1, v2)`, for the tests of a scan split in two halves.
pub(crate) fn split_table(dir: &TempDir) -> (PathBuf, Store, i64, i64) {
    let path = dir.file("run.db");
    let mut store = Store::open(&path, Synchronous::Normal).unwrap();
    let v1 = store.add_version("fp1", "{}", None).unwrap();
    let v2 = store.add_version("fp2", "{}", None).unwrap();
    store.append(&rows_across_the_middle(v1, v2)).unwrap();
    (path, store, v1, v2)
}

/// A fresh directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("snapperable-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn row(key: u8, version: i64, status: i64, output: Option<&[u8]>) -> ItemRow {
    ItemRow {
        key: [key; KEY_SIZE],
        version,
        status,
        input: None,
        output: output.map(<[u8]>::to_vec),
        error_type: (status != STATUS_OK).then(|| "ValueError".to_owned()),
        error: None,
        traceback: None,
        attempts: 1,
        started: 1.0,
        ended: 2.0,
    }
}

/// Keys of one repeated byte each, concatenated.
pub(crate) fn keys_of(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().flat_map(|&byte| [byte; KEY_SIZE]).collect()
}

#[test]
fn round_trip_with_superseding_rows() {
    let dir = TempDir::new();
    let path = dir.file("run.db");
    let mut store = Store::open(&path, Synchronous::Full).unwrap();
    let v1 = store.add_version("fp1", "{}", None).unwrap();
    let v2 = store.add_version("fp2", "{}", Some(v1)).unwrap();
    let versions = store.versions().unwrap();
    assert_eq!((versions[0].id, versions[0].uses), (v1, v1));
    assert_eq!((versions[1].id, versions[1].uses), (v2, v1));

    store
        .append(&[
            row(1, v1, 0, Some(b"one")),
            row(2, v1, 1, None),
            row(3, v1, 0, Some(b"three")),
            row(2, v1, 0, Some(b"two")), // supersedes the failure
            row(3, v1, 1, None),         // supersedes the success
            row(1, v2, 1, None),
        ])
        .unwrap();
    store.close().unwrap();

    let store = Store::open(&path, Synchronous::Normal).unwrap();
    let ok = store.key_set(Some(v1), 0).unwrap();
    assert!(ok.contains(&[1; 16]) && ok.contains(&[2; 16]) && !ok.contains(&[3; 16]));
    let failed_anywhere = store.key_set(None, 1).unwrap();
    assert_eq!(failed_anywhere.len(), 2); // key 3 in v1, key 1 in v2

    let (mut ok, failed) = store.key_sets(v1).unwrap();
    assert_eq!((ok.len(), failed.len()), (2, 1));
    let ok = ok.table();
    assert!(ok.contains(&[1; 16]) && ok.contains(&[2; 16]) && failed.contains(&[3; 16]));

    let latest = store.latest_outputs(v1).unwrap();
    let in_save_order: Vec<&[u8]> = latest
        .indexes_in_save_order()
        .into_iter()
        .map(|index| latest.output(index))
        .collect();
    assert_eq!(in_save_order, vec![&b"one"[..], &b"two"[..]]);
    let mut wanted = vec![3u8; 16];
    wanted.extend_from_slice(&[2; 16]);
    wanted.extend_from_slice(&[1; 16]);
    wanted.extend_from_slice(&[2; 16]);
    let keys = crate::keys::split_keys(&wanted).unwrap();
    let for_keys: Vec<&[u8]> = latest
        .indexes_for(keys)
        .unwrap()
        .into_iter()
        .map(|index| latest.output(index))
        .collect();
    assert_eq!(for_keys, vec![&b"two"[..], &b"one"[..], &b"two"[..]]);
    assert_eq!(latest.get(&[2; 16]), Some(&b"two"[..]));
    assert_eq!(latest.get(&[3; 16]), None);

    let all = store.rows_after(None, 0, 100, false).unwrap();
    assert_eq!(all.len(), 6);
    let page = store.rows_after(Some(v1), all[1].seq, 2, false).unwrap();
    assert_eq!(
        page.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![all[2].seq, all[3].seq]
    );
}
