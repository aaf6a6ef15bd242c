//! Input keys: the canonical encoding of docs/architecture.md section 4, byte for byte
//! the same as the pure-Python reference `snapperable/keys.py`, and a compact set of keys.
//!
//! This module is pure Rust: it encodes values already taken apart into Rust types.
//! Walking Python objects (which needs the interpreter) lives in `python/keys.rs`.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hash, Hasher};

use blake2b_simd::many::{hash_many, HashManyJob};
use blake2b_simd::Params;

use crate::contract::KEY_SIZE;
use crate::errors::{Error, Result};

pub type Key = [u8; KEY_SIZE];

/// Containers nested deeper than this cannot be keyed (they could exhaust the stack).
pub const MAX_DEPTH: usize = 256;
const KEY_PREFIX: &[u8] = b"K1";
const QUIET_NAN: [u8; 8] = [0x7f, 0xf8, 0, 0, 0, 0, 0, 0];
const KEY_HINT: &str = "pass key= to Snapper to choose each item's identity yourself";

/// The BLAKE2b parameters of a key: a 16-byte digest, no key, salt or personalization.
fn key_params() -> Params {
    let mut params = Params::new();
    params.hash_length(KEY_SIZE);
    params
}

fn key_from_digest(digest: &[u8]) -> Key {
    let mut key = [0u8; KEY_SIZE];
    if let Some(head) = digest.get(..KEY_SIZE) {
        key.copy_from_slice(head);
    }
    key
}

/// `blake2b(b"K1" + canon, digest_size=16)`.
pub fn key_of_canon(canon: &[u8]) -> Key {
    let hash = key_params()
        .to_state()
        .update(KEY_PREFIX)
        .update(canon)
        .finalize();
    key_from_digest(hash.as_bytes())
}

/// The keys of many inputs at once: their messages (`b"K1" + canon`) are written back
/// to back, then hashed several at a time (`blake2b_simd::many`: 4 per AVX2 pass, 2 per
/// SSE4.1 pass), which for small inputs such as ints is what a key mostly costs.
#[derive(Default)]
pub struct KeyBatch {
    messages: Vec<u8>,
    /// Where each message ends in `messages`.
    ends: Vec<usize>,
}

impl KeyBatch {
    pub fn with_capacity(inputs: usize) -> Self {
        KeyBatch {
            messages: Vec::with_capacity(inputs.saturating_mul(16)),
            ends: Vec::with_capacity(inputs),
        }
    }

    /// Starts the next input's message: the canonical encoding is to be appended to the
    /// buffer returned, then [`KeyBatch::finish`] called.
    pub fn begin(&mut self) -> &mut Vec<u8> {
        self.messages.extend_from_slice(KEY_PREFIX);
        &mut self.messages
    }

    pub fn finish(&mut self) {
        self.ends.push(self.messages.len());
    }

    /// The keys of the messages, concatenated, in order.
    pub fn keys(&self) -> Vec<u8> {
        /// Messages hashed per `hash_many` call: a job holds a whole hash state (~200
        /// bytes), so a million at once would take a large buffer for nothing.
        const GROUP: usize = 64;
        let params = key_params();
        let mut keys = Vec::with_capacity(self.ends.len() * KEY_SIZE);
        let mut jobs: Vec<HashManyJob<'_>> = Vec::with_capacity(GROUP);
        let mut start = 0;
        for group in self.ends.chunks(GROUP) {
            jobs.clear();
            for &end in group {
                let message = self.messages.get(start..end).unwrap_or_default();
                jobs.push(HashManyJob::new(&params, message));
                start = end;
            }
            hash_many(jobs.iter_mut());
            for job in &jobs {
                keys.extend_from_slice(&key_from_digest(job.to_hash().as_bytes()));
            }
        }
        keys
    }
}

/// The type tags of the encoding, one byte each.
pub mod tag {
    pub const NONE: u8 = b'n';
    pub const TRUE: u8 = b'T';
    pub const FALSE: u8 = b'F';
    pub const INT: u8 = b'i';
    pub const FLOAT: u8 = b'f';
    pub const STR: u8 = b's';
    pub const BYTES: u8 = b'b';
    pub const TUPLE: u8 = b't';
    pub const LIST: u8 = b'l';
    pub const DICT: u8 = b'd';
    pub const SET: u8 = b'S';
    pub const PICKLED: u8 = b'p';
    /// A namedtuple that cannot be pickled: its field names and values.
    pub const NAMED_TUPLE: u8 = b'N';
}

/// The error for a value a key cannot be computed for; the text is the reference's.
pub fn key_error(what: &str) -> Error {
    Error::Key(format!("cannot compute an input key: {what}; {KEY_HINT}"))
}

pub fn too_deep() -> Error {
    key_error(&format!("nesting is deeper than {MAX_DEPTH} levels"))
}

pub fn unpicklable(type_name: &str, reason: &str) -> Error {
    Error::Key(format!(
        "cannot compute an input key for an object of type {type_name}: it cannot be \
         pickled ({reason}); {KEY_HINT}"
    ))
}

/// Appends `tag` + u32-LE `n`; `what` names the value in the error if `n` overflows.
pub fn push_header(out: &mut Vec<u8>, tag: u8, n: usize, what: &str) -> Result<()> {
    let n = u32::try_from(n).map_err(|_| key_error(&format!("{what} is too large")))?;
    out.push(tag);
    out.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

pub fn push_none(out: &mut Vec<u8>) {
    out.push(tag::NONE);
}

pub fn push_bool(out: &mut Vec<u8>, value: bool) {
    out.push(if value { tag::TRUE } else { tag::FALSE });
}

/// An int that fits in i64: the minimal two's-complement bytes, `(bit_length + 8) // 8`
/// of them (one more than strictly needed for the sign, as the reference does).
pub fn push_i64(out: &mut Vec<u8>, value: i64) {
    let bit_length = 64 - value.unsigned_abs().leading_zeros() as usize;
    let len = (bit_length + 8) / 8; // at most 9, for i64::MIN
    let wide = i128::from(value).to_le_bytes();
    out.push(tag::INT);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&wide[..len]);
}

/// An int given as its two's-complement little-endian bytes (Python's `int.to_bytes`).
pub fn push_int_bytes(out: &mut Vec<u8>, le_bytes: &[u8]) -> Result<()> {
    push_header(out, tag::INT, le_bytes.len(), "an int")?;
    out.extend_from_slice(le_bytes);
    Ok(())
}

pub fn push_float(out: &mut Vec<u8>, value: f64) {
    out.push(tag::FLOAT);
    if value.is_nan() {
        out.extend_from_slice(&QUIET_NAN);
    } else {
        // `value + 0.0` turns -0.0 into 0.0 and leaves every other value alone.
        out.extend_from_slice(&(value + 0.0).to_be_bytes());
    }
}

/// A str given as its UTF-8 (`surrogatepass`) bytes.
pub fn push_str(out: &mut Vec<u8>, utf8: &[u8]) -> Result<()> {
    push_header(out, tag::STR, utf8.len(), "a str")?;
    out.extend_from_slice(utf8);
    Ok(())
}

pub fn push_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> Result<()> {
    push_header(out, tag::BYTES, bytes.len(), "a bytes value")?;
    out.extend_from_slice(bytes);
    Ok(())
}

pub fn push_pickled(out: &mut Vec<u8>, pickle: &[u8]) -> Result<()> {
    push_header(out, tag::PICKLED, pickle.len(), "a pickled object")?;
    out.extend_from_slice(pickle);
    Ok(())
}

/// A set: its members' encodings in bytewise order, so the key ignores iteration order.
pub fn push_set(out: &mut Vec<u8>, mut members: Vec<Vec<u8>>) -> Result<()> {
    push_header(out, tag::SET, members.len(), "a set")?;
    members.sort_unstable();
    for member in members {
        out.extend_from_slice(&member);
    }
    Ok(())
}

/// A dict: `(canon(key), canon(value))` pairs in bytewise order of the pair, as Python
/// sorts the tuples (distinct keys can share an encoding, e.g. two NaNs; the value then
/// decides).
pub fn push_dict(out: &mut Vec<u8>, mut pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
    push_header(out, tag::DICT, pairs.len(), "a dict")?;
    pairs.sort_unstable();
    for (key, value) in pairs {
        out.extend_from_slice(&key);
        out.extend_from_slice(&value);
    }
    Ok(())
}

/// Hashes a [`Key`] by its first eight bytes. Keys are BLAKE2b digests, already uniformly
/// distributed, so running them through SipHash again would only cost time.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached through `KeyHash::hash`, which passes exactly eight bytes; fold
        // anything else in rather than assume.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// A [`Key`] whose `Hash` feeds [`KeyHasher`] one word (a plain `[u8; 16]` would also
/// hash its length).
#[derive(Clone, Copy, PartialEq, Eq)]
struct KeyHash(Key);

impl Hash for KeyHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(word));
    }
}

/// A ([`Key`], version) pair, hashed as one word: the key's first eight bytes mixed with
/// the version (multiplied by an odd constant so that small versions spread out).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyVersion(pub Key, pub i64);

impl Hash for KeyVersion {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.0[..8]);
        let version = (self.1 as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        state.write_u64(u64::from_le_bytes(word) ^ version);
    }
}

type FastBuild = BuildHasherDefault<KeyHasher>;

/// A map from keys to `V`, hashed as cheaply as [`KeySet`].
pub struct KeyMap<V>(HashMap<KeyHash, V, FastBuild>);

impl<V> Default for KeyMap<V> {
    fn default() -> Self {
        Self(HashMap::default())
    }
}

impl<V> KeyMap<V> {
    pub fn with_capacity(capacity: usize) -> Self {
        Self(HashMap::with_capacity_and_hasher(
            capacity,
            FastBuild::default(),
        ))
    }

    /// Inserts or replaces; returns the value replaced, if any.
    pub fn insert(&mut self, key: Key, value: V) -> Option<V> {
        self.0.insert(KeyHash(key), value)
    }

    pub fn get(&self, key: &Key) -> Option<&V> {
        self.0.get(&KeyHash(*key))
    }

    pub fn remove(&mut self, key: &Key) -> Option<V> {
        self.0.remove(&KeyHash(*key))
    }

    /// The entries, in no particular order.
    pub fn into_entries(self) -> impl Iterator<Item = (Key, V)> {
        self.0.into_iter().map(|(key, value)| (key.0, value))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.0.values()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A map from (key, version) pairs to `V`.
pub type KeyVersionMap<V> = HashMap<KeyVersion, V, FastBuild>;

/// A set of keys stored inline: 16 bytes plus one control byte per slot, about 20 to 37
/// bytes per key depending on the table's load, and no allocation per key.
#[derive(Default)]
pub struct KeySet(HashSet<KeyHash, FastBuild>);

impl KeySet {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set with room for `capacity` keys, so filling it does not rehash.
    pub fn with_capacity(capacity: usize) -> Self {
        Self(HashSet::with_capacity_and_hasher(
            capacity,
            FastBuild::default(),
        ))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.0.contains(&KeyHash(*key))
    }

    pub fn iter(&self) -> impl Iterator<Item = Key> + '_ {
        self.0.iter().map(|key| key.0)
    }

    pub fn insert(&mut self, key: Key) -> bool {
        self.0.insert(KeyHash(key))
    }

    pub fn reserve(&mut self, additional: usize) {
        self.0.reserve(additional);
    }

    pub fn remove(&mut self, key: &Key) -> bool {
        self.0.remove(&KeyHash(*key))
    }

    /// Positions `i` of `keys` (16 bytes each, concatenated) whose key is not in the
    /// set, adding each such key as it goes: a key repeated within `keys` is claimed
    /// once, at its first position.
    pub fn claim(&mut self, keys: &[u8]) -> Result<Vec<usize>> {
        // Room for all of them at once (a fresh run claims every key): one resize at
        // most, not one in the middle of the loop.
        self.reserve(keys.len() / KEY_SIZE);
        Ok(split_keys(keys)?
            .enumerate()
            .filter_map(|(i, key)| self.insert(key).then_some(i))
            .collect())
    }
}

/// A set of keys to claim from (`claim`), which may still be the list a scan found.
///
/// A run that resumes a finished checkpoint claims its inputs' keys in the order they
/// were saved: while claims ask for exactly the listed keys, in order, each is answered
/// by comparing bytes (all are in the set; nothing to claim). The first claim that asks
/// for anything else, and any other use but `len` and `iter`, first puts the keys in a
/// table, and the set is from then on a plain [`KeySet`]. A resume of a million finished
/// items so builds no table at all.
#[derive(Default)]
pub struct ClaimSet {
    /// Distinct keys, concatenated, not in `table` (which is empty while they exist).
    listed: Vec<u8>,
    /// How many bytes of `listed` claims have asked for, in order, so far.
    claimed: usize,
    table: KeySet,
}

impl From<KeySet> for ClaimSet {
    fn from(table: KeySet) -> Self {
        ClaimSet {
            listed: Vec::new(),
            claimed: 0,
            table,
        }
    }
}

impl ClaimSet {
    /// The set of `keys` (concatenated), which must all be distinct.
    pub fn listed(keys: Vec<u8>) -> Result<Self> {
        let _ = split_keys(&keys)?; // the length check
        Ok(ClaimSet {
            listed: keys,
            claimed: 0,
            table: KeySet::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.table.len() + self.listed.len() / KEY_SIZE
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The set as a table, building it from the list first if need be.
    pub fn table(&mut self) -> &mut KeySet {
        if !self.listed.is_empty() {
            let listed = std::mem::take(&mut self.listed);
            self.claimed = 0;
            let mut keys: Vec<Key> = match split_keys(&listed) {
                Ok(keys) => keys.collect(),
                Err(_) => Vec::new(), // not reached: checked when listed
            };
            drop(listed);
            order_for_table(&mut keys, |key| key);
            self.table.reserve(keys.len());
            for key in keys {
                self.table.insert(key);
            }
        }
        &mut self.table
    }

    /// The keys, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = Key> + '_ {
        let listed = self.listed.chunks_exact(KEY_SIZE).map(|chunk| {
            let mut key = [0u8; KEY_SIZE];
            key.copy_from_slice(chunk);
            key
        });
        listed.chain(self.table.iter())
    }

    /// As [`KeySet::claim`].
    pub fn claim(&mut self, keys: &[u8]) -> Result<Vec<usize>> {
        let _ = split_keys(keys)?; // the length check
        if !self.listed.is_empty() {
            let end = self.claimed.saturating_add(keys.len());
            if self.listed.get(self.claimed..end) == Some(keys) {
                self.claimed = end;
                return Ok(Vec::new());
            }
        }
        self.table().claim(keys)
    }
}

impl FromIterator<Key> for KeySet {
    fn from_iter<I: IntoIterator<Item = Key>>(iter: I) -> Self {
        Self(iter.into_iter().map(KeyHash).collect())
    }
}

/// Items below this count are left in their order by [`order_for_table`]: their table
/// fits in the CPU caches, where the order of accesses hardly matters.
const LOCALITY_MIN_ITEMS: usize = 1 << 15;

/// Reorders `items` (stably, so items with the same key keep their order) by the low 24
/// bits of their key's hash.
///
/// The std hash table puts a key at the slot given by the low bits of its hash, so
/// visiting keys in this order sweeps a table of up to 2^24 slots in a few sequential
/// passes instead of missing the cache on every key: a million inserts into a table
/// that a SQLite scan keeps evicting from the caches take about a quarter of the time.
/// If the table ever placed keys differently, only that gain would be lost.
pub fn order_for_table<T: Copy>(items: &mut Vec<T>, key: impl Fn(&T) -> &Key) {
    if items.len() < LOCALITY_MIN_ITEMS {
        return;
    }
    // Least significant digit radix sort, one byte a pass; the hash is the key's first
    // eight bytes read little-endian (see `KeyHash`), so its low bits are bytes 0..3.
    let mut from = std::mem::take(items);
    let mut to = from.clone();
    for byte in 0..3 {
        let mut next = [0usize; 256];
        for item in &from {
            next[usize::from(key(item)[byte])] += 1;
        }
        let mut start = 0;
        for slot in &mut next {
            let count = *slot;
            *slot = start;
            start += count;
        }
        for item in &from {
            let digit = usize::from(key(item)[byte]);
            // `next[digit]` < len: the counts above sum to `from.len()` == `to.len()`.
            if let Some(place) = to.get_mut(next[digit]) {
                *place = *item;
            }
            next[digit] += 1;
        }
        std::mem::swap(&mut from, &mut to);
    }
    *items = from;
}

/// The first eight bytes of a key, as a number (keys are digests: uniformly spread).
pub fn key_prefix(key: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    if let Some(head) = key.get(..8) {
        word.copy_from_slice(head);
    }
    u64::from_le_bytes(word)
}

/// Whether no two of `prefixes` are equal (sorts them; 8 bytes a key, no table).
pub fn all_distinct(mut prefixes: Vec<u64>) -> bool {
    prefixes.sort_unstable();
    prefixes.windows(2).all(|pair| pair[0] != pair[1])
}

/// Whether no two keys of `keys` (concatenated, [`KEY_SIZE`] bytes each) share their
/// first eight bytes.
///
/// Without a table or a sort of them all: a first pass marks each key's slot in a
/// bitmap of about 8 bits a key and notes the slots hit twice; only the keys in those
/// slots (a few percent) are then compared. 3M keys: 8 MB and two sequential passes,
/// where a sort would take 24 MB (while a load's result is being built) and longer.
pub fn keys_distinct(keys: &[u8]) -> bool {
    let count = keys.len() / KEY_SIZE;
    if count < 2 {
        return true;
    }
    let bits = count.saturating_mul(8).next_power_of_two().max(64);
    let mask = bits - 1;
    let slot = |key: &[u8]| {
        // Truncating to usize keeps the low bits, the ones the mask keeps anyway.
        let at = (key_prefix(key) as usize) & mask;
        (at / 64, 1u64 << (at % 64))
    };
    let mut seen = vec![0u64; bits / 64];
    let mut twice = vec![0u64; bits / 64];
    for key in keys.chunks_exact(KEY_SIZE) {
        let (word, bit) = slot(key);
        if let (Some(seen), Some(twice)) = (seen.get_mut(word), twice.get_mut(word)) {
            if *seen & bit != 0 {
                *twice |= bit;
            } else {
                *seen |= bit;
            }
        }
    }
    drop(seen);
    let suspects = keys
        .chunks_exact(KEY_SIZE)
        .filter(|key| {
            let (word, bit) = slot(key);
            twice.get(word).is_some_and(|twice| twice & bit != 0)
        })
        .map(key_prefix)
        .collect();
    all_distinct(suspects)
}

/// How many keys a buffer of concatenated keys holds; an error if its length is not a
/// multiple of [`KEY_SIZE`].
pub fn key_count(keys: &[u8]) -> Result<usize> {
    if !keys.len().is_multiple_of(KEY_SIZE) {
        return Err(Error::InvalidArgument(format!(
            "keys must be a concatenation of {KEY_SIZE}-byte keys, got {} bytes",
            keys.len()
        )));
    }
    Ok(keys.len() / KEY_SIZE)
}

/// The keys of a buffer of concatenated keys; an error if its length is not a multiple
/// of [`KEY_SIZE`].
pub fn split_keys(keys: &[u8]) -> Result<impl Iterator<Item = Key> + '_> {
    key_count(keys)?;
    Ok(keys.chunks_exact(KEY_SIZE).map(|chunk| {
        let mut key = [0u8; KEY_SIZE];
        key.copy_from_slice(chunk);
        key
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn canon(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        f(&mut out);
        out
    }

    #[test]
    fn ints_use_python_length_rule() {
        // (x.bit_length() + 8) // 8 bytes, two's complement little-endian.
        let cases: &[(i64, &str)] = &[
            (0, "690100000000"),
            (1, "690100000001"),
            (-1, "6901000000ff"),
            (127, "69010000007f"),
            (128, "69020000008000"),
            (-128, "690200000080ff"),
            (255, "6902000000ff00"),
            (i64::MAX, "6908000000ffffffffffffff7f"),
            (i64::MIN, "69090000000000000000000080ff"),
        ];
        for &(value, expected) in cases {
            assert_eq!(
                hex(&canon(|o| push_i64(o, value))),
                expected,
                "canon({value})"
            );
        }
    }

    #[test]
    fn floats_fold_negative_zero_and_nans() {
        assert_eq!(hex(&canon(|o| push_float(o, -0.0))), "660000000000000000");
        assert_eq!(hex(&canon(|o| push_float(o, 1.5))), "663ff8000000000000");
        let weird_nan = f64::from_bits(0xfff8_0000_0000_0001);
        assert_eq!(
            hex(&canon(|o| push_float(o, weird_nan))),
            "667ff8000000000000"
        );
        assert_eq!(
            hex(&canon(|o| push_float(o, f64::INFINITY))),
            "667ff0000000000000"
        );
    }

    #[test]
    fn scalars_and_key_match_python_reference() {
        // Values from snapperable.keys: canon("hé") and input_key(None).
        assert_eq!(
            hex(&canon(|o| push_str(o, "hé".as_bytes()).unwrap())),
            "730300000068c3a9"
        );
        assert_eq!(hex(&canon(push_none)), "6e");
        assert_eq!(hex(&canon(|o| push_bool(o, true))), "54");
        assert_eq!(hex(&key_of_canon(b"n")), "4b4299cfb5bc6c9ae8849f4b86d9c1e3");
    }

    #[test]
    fn sets_and_dicts_sort_encodings() {
        let set = canon(|o| push_set(o, vec![b"b".to_vec(), b"a".to_vec()]).unwrap());
        assert_eq!(set, b"S\x02\x00\x00\x00ab");
        let pairs = vec![
            (b"k".to_vec(), b"2".to_vec()),
            (b"k".to_vec(), b"1".to_vec()),
            (b"a".to_vec(), b"9".to_vec()),
        ];
        let dict = canon(|o| push_dict(o, pairs).unwrap());
        assert_eq!(dict, b"d\x03\x00\x00\x00a9k1k2");
    }

    #[test]
    fn key_errors_carry_the_reference_text() {
        assert_eq!(
            too_deep().to_string(),
            "cannot compute an input key: nesting is deeper than 256 levels; pass key= to \
             Snapper to choose each item's identity yourself"
        );
    }

    #[test]
    fn order_for_table_is_stable_and_groups_low_hash_bits() {
        let n = LOCALITY_MIN_ITEMS + 1000;
        let mut items: Vec<(Key, usize)> = (0..n)
            .map(|i| (key_of_canon(&(i % 5000).to_le_bytes()), i))
            .collect();
        order_for_table(&mut items, |item| &item.0);
        assert_eq!(items.len(), n);
        let low24 = |key: &Key| u32::from_le_bytes([key[0], key[1], key[2], 0]);
        for pair in items.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            assert!(low24(&a.0) <= low24(&b.0));
            if a.0 == b.0 {
                assert!(a.1 < b.1, "items with one key keep their order");
            }
        }
        let mut seen: Vec<usize> = items.iter().map(|item| item.1).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn key_set_membership_and_claim() {
        let mut set = KeySet::new();
        assert!(set.insert([1; 16]));
        assert!(!set.insert([1; 16]));
        set.insert([2; 16]);
        assert_eq!(set.len(), 2);
        let query: Vec<u8> = [2u8, 3, 1, 4, 3, 4, 5]
            .iter()
            .flat_map(|&byte| [byte; 16])
            .collect();
        assert_eq!(set.claim(&query).unwrap(), vec![1, 3, 6]);
        assert_eq!(set.len(), 5);
        assert_eq!(set.claim(&query).unwrap(), Vec::<usize>::new());
        assert!(matches!(
            set.claim(&[0; 17]),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(set.len(), 5);
    }

    #[test]
    fn keys_distinct_finds_a_repeat_among_many() {
        let many: Vec<u8> = (0..50_000u32)
            .flat_map(|i| key_of_canon(&i.to_le_bytes()))
            .collect();
        assert!(keys_distinct(&many));
        assert!(keys_distinct(&[]) && keys_distinct(&many[..KEY_SIZE]));
        let mut repeated = many.clone();
        repeated.extend_from_slice(&many[KEY_SIZE * 31_337..KEY_SIZE * 31_338]);
        assert!(!keys_distinct(&repeated));
        // Keys that share their low bits (one bitmap slot) but differ: still distinct.
        let mut crowded = Vec::new();
        for i in 0..100u64 {
            let mut key = [0u8; KEY_SIZE];
            key[..8].copy_from_slice(&(i << 40).to_le_bytes());
            crowded.extend_from_slice(&key);
        }
        assert!(keys_distinct(&crowded));
        crowded.extend_from_slice(&[0u8; KEY_SIZE]);
        assert!(!keys_distinct(&crowded));
    }

    #[test]
    fn batched_keys_are_the_single_ones() {
        let canons: Vec<Vec<u8>> = (0..1000usize)
            .map(|i| (0..i % 300).map(|b| (b * 7 + i) as u8).collect())
            .collect();
        let mut batch = KeyBatch::with_capacity(canons.len());
        for canon in &canons {
            batch.begin().extend_from_slice(canon);
            batch.finish();
        }
        let single: Vec<u8> = canons.iter().flat_map(|c| key_of_canon(c)).collect();
        assert_eq!(batch.keys(), single);
        assert!(KeyBatch::default().keys().is_empty());
    }

    #[test]
    fn claim_set_answers_claims_in_list_order_then_becomes_a_table() {
        let key = |i: u8| [i; KEY_SIZE];
        let listed: Vec<u8> = (1..=6).flat_map(key).collect();
        let mut set = ClaimSet::listed(listed.clone()).unwrap();
        assert_eq!(set.len(), 6);
        assert_eq!(
            set.claim(&listed[..2 * KEY_SIZE]).unwrap(),
            Vec::<usize>::new()
        );
        assert_eq!(
            set.claim(&listed[2 * KEY_SIZE..4 * KEY_SIZE]).unwrap(),
            Vec::<usize>::new()
        );
        assert!(!set.listed.is_empty(), "in-order claims need no table");
        // Out of order, with a new key and a repeat: the table answers, as a KeySet would.
        let mut query = key(1).to_vec();
        query.extend(key(9));
        query.extend(key(9));
        query.extend(key(6));
        assert_eq!(set.claim(&query).unwrap(), vec![1]);
        assert!(set.listed.is_empty());
        assert_eq!(set.len(), 7);
        let mut all: Vec<Key> = set.iter().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            vec![key(1), key(2), key(3), key(4), key(5), key(6), key(9)]
        );
        assert!(set.table().contains(&key(5)));

        // Past the end of the list: the keys beyond may repeat listed ones.
        let mut set = ClaimSet::listed(listed.clone()).unwrap();
        let mut beyond = listed.clone();
        beyond.extend(key(3));
        beyond.extend(key(7));
        assert_eq!(set.claim(&beyond).unwrap(), vec![7]);
        assert!(matches!(set.claim(&[0; 5]), Err(Error::InvalidArgument(_))));
        assert!(ClaimSet::listed(vec![0; 17]).is_err());
    }
}
