//! `SqliteCheckpoint.process`: the per-item hot loop of a run, in Rust.
//!
//! For each position: the user's function, `pickle.dumps` of its output, two Unix
//! timestamps and one row pushed to the writer's pending buffer, with no Python frame
//! of snapperable's own in between. Failures are not handled here: the first exception
//! stops the loop and is handed back, with what the Snapper needs to retry, record or
//! raise it (`ProcessStop` in `_contract.py`).
//!
//! The GIL is held throughout (the function and the pickler need it); the writer never
//! needs it, so rows keep being committed while the loop runs. No Python object is
//! kept past the call: each row holds only Rust copies of its key and payload.

#[cfg(unix)]
use std::os::raw::c_void;
use std::sync::OnceLock;

use pyo3::exceptions::{PyIndexError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyInt, PyList, PyTuple};

use crate::checkpoint::Checkpoint;
use crate::contract::{KEY_SIZE, PICKLE_PROTOCOL, STATUS_OK};
use crate::keys::{self, Key};
use crate::pickles::{dump_simple, Simple};
use crate::python::imports::pickle_dumps;
use crate::store::{unix_now, ItemRow};
use crate::writer::Pending;

/// `(index into positions, started, exception, raised_by_pickling, output)`.
pub type ProcessStop<'py> = (
    usize,
    f64,
    Bound<'py, PyAny>,
    bool,
    Option<Bound<'py, PyAny>>,
);

/// `PyObject_Vectorcall`'s signature (stable ABI from 3.12, exported since 3.11).
type VectorcallFn = unsafe extern "C" fn(
    *mut ffi::PyObject,
    *const *mut ffi::PyObject,
    usize,
    *mut ffi::PyObject,
) -> *mut ffi::PyObject;

/// Lets the callee borrow `args[-1]` (bound methods prepend `self` there, no copy).
const PY_VECTORCALL_ARGUMENTS_OFFSET: usize = 1 << (usize::BITS - 1);

/// Calls with positional arguments: through `PyObject_Vectorcall` where the running
/// interpreter exports it (3.11+), otherwise through an argument tuple.
///
/// The extension is built for the stable ABI of 3.9, which has no vectorcall; a direct
/// reference to the symbol would stop the module from loading on 3.9 and 3.10. So it is
/// looked up at run time, and only on an interpreter known to export it with this
/// signature. It saves a tuple per call, twice per item (the function and the pickler).
#[derive(Clone, Copy)]
struct Caller(Option<VectorcallFn>);

impl Caller {
    fn new(py: Python<'_>) -> Self {
        static VECTORCALL: OnceLock<Option<VectorcallFn>> = OnceLock::new();
        Caller(*VECTORCALL.get_or_init(|| find_vectorcall(py)))
    }

    fn call1<'py>(
        self,
        callable: &Bound<'py, PyAny>,
        arg: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let Some(vectorcall) = self.0 else {
            return callable.call1((arg,));
        };
        // Slot 0 is scratch space for the callee (PY_VECTORCALL_ARGUMENTS_OFFSET).
        let mut args = [std::ptr::null_mut(), arg.as_ptr()];
        // SAFETY: the GIL is held (`Bound`); `args[1..]` holds one borrowed reference
        // that outlives the call, and `args[0]` is ours to lend to the callee. The
        // result is a new reference or NULL with an exception set.
        unsafe {
            let result = vectorcall(
                callable.as_ptr(),
                args.as_mut_ptr().add(1),
                1 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                std::ptr::null_mut(),
            );
            Bound::from_owned_ptr_or_err(callable.py(), result)
        }
    }

    fn call2<'py>(
        self,
        callable: &Bound<'py, PyAny>,
        first: &Bound<'py, PyAny>,
        second: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let Some(vectorcall) = self.0 else {
            return callable.call1((first, second));
        };
        let mut args = [std::ptr::null_mut(), first.as_ptr(), second.as_ptr()];
        // SAFETY: as in `call1`, with two borrowed arguments.
        unsafe {
            let result = vectorcall(
                callable.as_ptr(),
                args.as_mut_ptr().add(1),
                2 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                std::ptr::null_mut(),
            );
            Bound::from_owned_ptr_or_err(callable.py(), result)
        }
    }
}

fn find_vectorcall(py: Python<'_>) -> Option<VectorcallFn> {
    if py.version_info() < (3, 11) {
        return None;
    }
    #[cfg(unix)]
    {
        // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches the loaded
        // images, the interpreter's included.
        let symbol: *mut c_void =
            unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"PyObject_Vectorcall".as_ptr()) };
        if symbol.is_null() {
            return None;
        }
        // SAFETY: in CPython 3.11+ `PyObject_Vectorcall` is an exported function with
        // exactly the signature of `VectorcallFn` (part of the stable ABI from 3.12).
        Some(unsafe { std::mem::transmute::<*mut c_void, VectorcallFn>(symbol) })
    }
    #[cfg(not(unix))]
    None
}

/// The inputs, read by position; lists and tuples without the generic protocol.
enum Items<'a, 'py> {
    List(&'a Bound<'py, PyList>),
    Tuple(&'a Bound<'py, PyTuple>),
    Other(&'a Bound<'py, PyAny>),
}

impl<'a, 'py> Items<'a, 'py> {
    fn new(items: &'a Bound<'py, PyAny>) -> Self {
        if let Ok(list) = items.cast::<PyList>() {
            Items::List(list)
        } else if let Ok(tuple) = items.cast::<PyTuple>() {
            Items::Tuple(tuple)
        } else {
            Items::Other(items)
        }
    }

    fn len(&self) -> PyResult<usize> {
        match self {
            Items::List(list) => Ok(list.len()),
            Items::Tuple(tuple) => Ok(tuple.len()),
            Items::Other(items) => items.len(),
        }
    }

    /// `items[position]`; bounds-checked at every read, since the function may resize
    /// a list it was given.
    fn get(&self, position: usize) -> PyResult<Bound<'py, PyAny>> {
        match self {
            Items::List(list) => list.get_item(position),
            Items::Tuple(tuple) => tuple.get_item(position),
            Items::Other(items) => items.get_item(position),
        }
    }
}

/// The output as a [`Simple`] value if it is exactly an int that fits in 64 bits, a
/// float, None or a bool (subclasses are pickled by pickle.dumps, as they must be).
fn simple_of(output: &Bound<'_, PyAny>) -> Option<Simple<'static>> {
    if output.is_exact_instance_of::<PyInt>() {
        return output.extract::<i64>().ok().map(Simple::Int);
    }
    if let Ok(float) = output.cast_exact::<PyFloat>() {
        return Some(Simple::Float(float.value()));
    }
    if output.is_none() {
        return Some(Simple::None);
    }
    if let Ok(flag) = output.cast_exact::<PyBool>() {
        return Some(Simple::Bool(flag.is_true()));
    }
    None
}

/// `positions` as indices, each checked against the items and the keys up front, so
/// bad arguments fail before any item is processed.
fn checked_positions(positions: Vec<isize>, items: usize, keys: usize) -> PyResult<Vec<usize>> {
    positions
        .into_iter()
        .map(|position| {
            usize::try_from(position)
                .ok()
                .filter(|&p| p < items && p < keys)
                .ok_or_else(|| {
                    PyIndexError::new_err(format!(
                        "position {position} is out of range of {items} items and {keys} keys"
                    ))
                })
        })
        .collect()
}

/// The hot loop of `SqliteCheckpoint.process` (contract in `_contract.py`).
pub fn process<'py>(
    checkpoint: &Checkpoint,
    func: &Bound<'py, PyAny>,
    items: &Bound<'py, PyAny>,
    keys: &[u8],
    positions: Vec<isize>,
    version: i64,
) -> PyResult<Option<ProcessStop<'py>>> {
    let py = func.py();
    let key_count = keys::key_count(keys)?;
    let items = Items::new(items);
    let positions = checked_positions(positions, items.len()?, key_count)?;
    if positions.is_empty() {
        return Ok(None);
    }
    // Nothing is computed for rows that could not be saved (the function may be slow
    // or cost money): a failed, closed or forked writer is raised now, and then before
    // each push, as `record` does.
    checkpoint.check_writer()?;
    let dumps = pickle_dumps(py)?;
    let protocol = PyInt::new(py, PICKLE_PROTOCOL).into_any();
    let caller = Caller::new(py);
    // One clock reading per item: an item ends when the next one starts (the time
    // between is the bookkeeping of the one that ended).
    let mut started = unix_now();
    for (index, &position) in positions.iter().enumerate() {
        // A builtin function never runs the interpreter's own signal check: without
        // this, Ctrl-C would wait for the whole loop. Raised between items, so the
        // item it interrupts was not started.
        py.check_signals()?;
        let item = items.get(position)?;
        let output = match caller.call1(func, &item) {
            Ok(output) => output,
            Err(err) => {
                return Ok(Some((
                    index,
                    started,
                    err.into_value(py).into_bound(py).into_any(),
                    false,
                    None,
                )))
            }
        };
        // An int, float, None or bool is pickled here, to the very bytes pickle.dumps
        // gives, without a call; anything else by pickle.dumps.
        let payload = match simple_of(&output).and_then(dump_simple) {
            Some(payload) => payload,
            None => match caller.call2(dumps, &output, &protocol) {
                Ok(payload) => payload
                    .cast::<PyBytes>()
                    .map_err(|_| PyTypeError::new_err("pickle.dumps did not return bytes"))?
                    .as_bytes()
                    .to_vec(),
                Err(err) => {
                    return Ok(Some((
                        index,
                        started,
                        err.into_value(py).into_bound(py).into_any(),
                        true,
                        Some(output),
                    )))
                }
            },
        };
        drop(output);
        let ended = unix_now();
        let start = position * KEY_SIZE;
        let mut key: Key = [0; KEY_SIZE];
        key.copy_from_slice(&keys[start..start + KEY_SIZE]);
        let pending = checkpoint.record(ItemRow {
            key,
            version,
            status: STATUS_OK,
            input: None,
            output: Some(payload),
            error_type: None,
            error: None,
            traceback: None,
            attempts: 1,
            started,
            ended,
        })?;
        started = ended;
        // A writer that lags (slow disk, big outputs) makes the loop wait here, without
        // the GIL, until it has taken the full buffer: memory and what a crash can lose
        // stay bounded (`Limits`).
        if pending == Pending::Full {
            py.detach(|| checkpoint.wait_for_room())?;
            started = unix_now(); // the wait is no item's time
        }
    }
    Ok(None)
}
