//! Reading back the simplest saved outputs without `pickle.loads`.
//!
//! A run over numbers saves millions of pickles such as `b"\x80\x04K\x05."` (the int 5).
//! `pickle.loads` of one costs far more than the value: a call, an unpickler, a frame.
//! The few shapes `pickle.dumps(value, 4)` gives for an int, a float, None, a bool or a
//! short str are read here instead, to exactly the value `pickle.loads` would give;
//! anything else (other objects, other protocols, a str that is not valid UTF-8, any
//! byte out of place) is left to `pickle.loads`, so nothing is ever read differently.
//!
//! Pure Rust; the binding turns a [`Simple`] into its Python object.

/// A value read from a pickle without unpickling it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Simple<'a> {
    Int(i64),
    Float(f64),
    None,
    Bool(bool),
    Str(&'a str),
}

// The opcodes of pickle protocol 4 that the shapes above use (Lib/pickle.py).
const PROTO: u8 = 0x80;
const FRAME: u8 = 0x95;
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const BININT: u8 = b'J';
const LONG1: u8 = 0x8a;
const BINFLOAT: u8 = b'G';
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const SHORT_BINUNICODE: u8 = 0x8c;
const MEMOIZE: u8 = 0x94;
const STOP: u8 = b'.';

/// The value of `pickle`, if it is one of the simple shapes; `None` means "unpickle it".
pub fn read_simple(pickle: &[u8]) -> Option<Simple<'_>> {
    let body = pickle.strip_prefix(&[PROTO, 4])?;
    // Protocol 4 frames anything of 4 bytes or more; a frame must span the rest exactly.
    let body = match body.strip_prefix(&[FRAME]) {
        Some(framed) => {
            let (length, rest) = framed.split_at_checked(8)?;
            let length = u64::from_le_bytes(length.try_into().ok()?);
            if usize::try_from(length).ok()? != rest.len() {
                return None;
            }
            rest
        }
        None => body,
    };
    let (&opcode, args) = body.split_first()?;
    let (value, rest) = match opcode {
        BININT1 => {
            let (&byte, rest) = args.split_first()?;
            (Simple::Int(i64::from(byte)), rest)
        }
        BININT2 => {
            let (bytes, rest) = args.split_at_checked(2)?;
            let value = u16::from_le_bytes(bytes.try_into().ok()?);
            (Simple::Int(i64::from(value)), rest)
        }
        BININT => {
            let (bytes, rest) = args.split_at_checked(4)?;
            let value = i32::from_le_bytes(bytes.try_into().ok()?);
            (Simple::Int(i64::from(value)), rest)
        }
        LONG1 => {
            let (&length, rest) = args.split_first()?;
            let (bytes, rest) = rest.split_at_checked(usize::from(length))?;
            (Simple::Int(signed_le(bytes)?), rest)
        }
        BINFLOAT => {
            let (bytes, rest) = args.split_at_checked(8)?;
            (
                Simple::Float(f64::from_be_bytes(bytes.try_into().ok()?)),
                rest,
            )
        }
        NONE => (Simple::None, args),
        NEWTRUE => (Simple::Bool(true), args),
        NEWFALSE => (Simple::Bool(false), args),
        SHORT_BINUNICODE => {
            let (&length, rest) = args.split_first()?;
            let (bytes, rest) = rest.split_at_checked(usize::from(length))?;
            // pickle writes str as UTF-8 with surrogatepass; a lone surrogate is not
            // valid UTF-8 and goes to pickle.loads.
            let text = std::str::from_utf8(bytes).ok()?;
            (
                Simple::Str(text),
                rest.strip_prefix(&[MEMOIZE]).unwrap_or(rest),
            )
        }
        _ => return None,
    };
    (rest == [STOP]).then_some(value)
}

/// `pickle.dumps(value, 4)` of a simple value, byte for byte as CPython's pickler
/// writes it (so files do not depend on which backend saved them); `None` for a str
/// of 256 UTF-8 bytes or more, which the caller leaves to `pickle.dumps`.
pub fn dump_simple(value: Simple<'_>) -> Option<Vec<u8>> {
    let mut body: Vec<u8> = Vec::with_capacity(16);
    match value {
        Simple::Int(int) => {
            if let Ok(byte) = u8::try_from(int) {
                body.extend_from_slice(&[BININT1, byte]);
            } else if let Ok(short) = u16::try_from(int) {
                body.push(BININT2);
                body.extend_from_slice(&short.to_le_bytes());
            } else if let Ok(word) = i32::try_from(int) {
                body.push(BININT);
                body.extend_from_slice(&word.to_le_bytes());
            } else {
                // encode_long: (bit length of |int|) / 8 + 1 bytes of two's complement,
                // less a redundant top 0xff of a negative number.
                let bits = 64 - int.unsigned_abs().leading_zeros() as usize;
                let mut length = bits / 8 + 1;
                let bytes = i128::from(int).to_le_bytes();
                if int < 0
                    && length > 1
                    && bytes.get(length - 1) == Some(&0xff)
                    && bytes.get(length - 2).is_some_and(|&byte| byte & 0x80 != 0)
                {
                    length -= 1;
                }
                body.push(LONG1);
                body.push(u8::try_from(length).ok()?);
                body.extend_from_slice(bytes.get(..length)?);
            }
        }
        Simple::Float(float) => {
            body.push(BINFLOAT);
            body.extend_from_slice(&float.to_be_bytes());
        }
        Simple::None => body.push(NONE),
        Simple::Bool(flag) => body.push(if flag { NEWTRUE } else { NEWFALSE }),
        Simple::Str(text) => {
            body.push(SHORT_BINUNICODE);
            body.push(u8::try_from(text.len()).ok()?);
            body.extend_from_slice(text.as_bytes());
            body.push(MEMOIZE);
        }
    }
    body.push(STOP);
    let mut pickle = Vec::with_capacity(body.len() + 11);
    pickle.extend_from_slice(&[PROTO, 4]);
    // The pickler frames what follows PROTO once it is 4 bytes or more.
    if body.len() >= 4 {
        pickle.push(FRAME);
        pickle.extend_from_slice(&(body.len() as u64).to_le_bytes());
    }
    pickle.extend_from_slice(&body);
    Some(pickle)
}

/// `int.from_bytes(bytes, "little", signed=True)` if it fits in an i64.
fn signed_le(bytes: &[u8]) -> Option<i64> {
    if bytes.len() > 8 {
        return None;
    }
    let negative = bytes.last().is_some_and(|&top| top & 0x80 != 0);
    let mut word = if negative { [0xff; 8] } else { [0; 8] };
    word.get_mut(..bytes.len())?.copy_from_slice(bytes);
    Some(i64::from_le_bytes(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_shapes_pickle_dumps_gives() {
        // From `pickle.dumps(value, 4)` on CPython 3.11.
        let cases: &[(&[u8], Simple<'_>)] = &[
            (b"\x80\x04K\x05.", Simple::Int(5)),
            (
                b"\x80\x04\x95\x04\x00\x00\x00\x00\x00\x00\x00M\x00\x01.",
                Simple::Int(256),
            ),
            (
                b"\x80\x04\x95\x06\x00\x00\x00\x00\x00\x00\x00J\xff\xff\xff\xff.",
                Simple::Int(-1),
            ),
            (
                b"\x80\x04\x95\x08\x00\x00\x00\x00\x00\x00\x00\x8a\x05\xff\xff\xff\x7f\xff.",
                Simple::Int(-2_147_483_649),
            ),
            (
                b"\x80\x04\x95\n\x00\x00\x00\x00\x00\x00\x00G?\xf8\x00\x00\x00\x00\x00\x00.",
                Simple::Float(1.5),
            ),
            (b"\x80\x04N.", Simple::None),
            (b"\x80\x04\x88.", Simple::Bool(true)),
            (
                b"\x80\x04\x95\x07\x00\x00\x00\x00\x00\x00\x00\x8c\x03h\xc3\xa9\x94.",
                Simple::Str("h\u{e9}"),
            ),
        ];
        for &(pickle, expected) in cases {
            assert_eq!(read_simple(pickle), Some(expected), "{pickle:?}");
        }
    }

    #[test]
    fn leaves_everything_else_to_pickle() {
        let cases: &[&[u8]] = &[
            b"",
            b"\x80\x04",
            b"\x80\x03K\x05.",                                            // protocol 3
            b"\x80\x04K\x05",                                             // no STOP
            b"\x80\x04K\x05..",                                           // trailing bytes
            b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00M\x00\x01.",    // frame too long
            b"\x80\x04\x95\x0c\x00\x00\x00\x00\x00\x00\x00\x8a\t\x00\x00\x00\x00\x00\x00\x00\x80\x00.", // 2**63
            b"\x80\x04\x95\x06\x00\x00\x00\x00\x00\x00\x00\x8c\x02\xed\xa0\x94.", // broken UTF-8
            b"\x80\x04]\x94.",                                            // an empty list
            b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00C\x01x\x94.",   // bytes
        ];
        for &pickle in cases {
            assert_eq!(read_simple(pickle), None, "{pickle:?}");
        }
    }

    #[test]
    fn long1_is_little_endian_twos_complement() {
        assert_eq!(signed_le(&[]), Some(0));
        assert_eq!(signed_le(&[0xff]), Some(-1));
        assert_eq!(signed_le(&[0x00, 0x80]), Some(-32768));
        assert_eq!(signed_le(&[0, 0, 0, 0, 0, 0, 0, 0x80]), Some(i64::MIN));
        assert_eq!(signed_le(&[0; 9]), None);
    }

    #[test]
    fn dump_simple_reads_back_and_matches_pickle() {
        assert_eq!(dump_simple(Simple::Int(5)).unwrap(), b"\x80\x04K\x05.");
        assert_eq!(
            dump_simple(Simple::Int(-2_147_483_649)).unwrap(),
            b"\x80\x04\x95\x08\x00\x00\x00\x00\x00\x00\x00\x8a\x05\xff\xff\xff\x7f\xff."
        );
        assert_eq!(
            dump_simple(Simple::Str("h\u{e9}")).unwrap(),
            b"\x80\x04\x95\x07\x00\x00\x00\x00\x00\x00\x00\x8c\x03h\xc3\xa9\x94."
        );
        for value in [
            Simple::Int(i64::MIN),
            Simple::Int(i64::MAX),
            Simple::Int(-1),
            Simple::Int(65_536),
            Simple::Float(-0.0),
            Simple::None,
            Simple::Bool(false),
            Simple::Str(""),
        ] {
            let pickle = dump_simple(value).unwrap();
            assert_eq!(read_simple(&pickle), Some(value), "{pickle:?}");
        }
        assert_eq!(dump_simple(Simple::Str(&"x".repeat(256))), None);
    }
}
