//! The constants of the backend contract, the Rust side's only home of them; the
//! Python side's is `snapperable/_contract.py`. `_core` exports them, and
//! `tests/test_contract.py` checks the two agree.

/// Bytes of one input key (the BLAKE2b digest size; README "Item identity").
pub const KEY_SIZE: usize = 16;

/// Status of an item row (docs/architecture.md 6.1): the integer in its `status` column.
pub const STATUS_OK: i64 = 0;
pub const STATUS_FAILED: i64 = 1;

/// The pickle protocol of every pickle a checkpoint stores, and of the `p` encoding of
/// input keys: 4 reads on every Python 3 snapperable supports.
pub const PICKLE_PROTOCOL: u8 = 4;
