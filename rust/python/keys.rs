//! Input keys of Python objects: walks a value by exact type and feeds `keys.rs`.
//!
//! Mirrors `snapperable/keys.py` step for step, including the order in which parts are
//! visited, so that a value with several problems raises the same one in both backends.

use pyo3::exceptions::PyException;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet, PyString,
    PyTuple,
};

use crate::contract::PICKLE_PROTOCOL;
use crate::keys::{self, tag, KeyBatch, MAX_DEPTH};
use crate::python::imports::pickle_dumps;

/// The 16-byte key that identifies an input across runs and processes.
#[pyfunction]
pub fn input_key<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let mut canon = Vec::new();
    canon_into(obj, 0, &mut canon)?;
    Ok(PyBytes::new(obj.py(), &keys::key_of_canon(&canon)))
}

/// The keys of `objs`, concatenated (16 bytes each).
#[pyfunction]
pub fn input_keys<'py>(objs: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    // Encoded one by one (that needs the objects), hashed all together.
    let mut batch = KeyBatch::with_capacity(objs.len().unwrap_or(0));
    for obj in objs.try_iter()? {
        canon_into(&obj?, 0, batch.begin())?;
        batch.finish();
    }
    Ok(PyBytes::new(objs.py(), &batch.keys()))
}

/// Appends `canon(obj)` to `out`; `depth` is how many containers enclose `obj`.
fn canon_into(obj: &Bound<'_, PyAny>, depth: usize, out: &mut Vec<u8>) -> PyResult<()> {
    // Most frequent types first; every check is an exact-type pointer comparison.
    if obj.is_exact_instance_of::<PyInt>() {
        return canon_int(obj, out);
    }
    if let Ok(value) = obj.cast_exact::<PyFloat>() {
        keys::push_float(out, value.value());
        return Ok(());
    }
    if let Ok(value) = obj.cast_exact::<PyString>() {
        return canon_str(value, out);
    }
    if let Ok(value) = obj.cast_exact::<PyBytes>() {
        return Ok(keys::push_bytes(out, value.as_bytes())?);
    }
    if let Ok(value) = obj.cast_exact::<PyByteArray>() {
        return Ok(keys::push_bytes(out, &value.to_vec())?);
    }
    if obj.is_none() {
        keys::push_none(out);
        return Ok(());
    }
    if let Ok(value) = obj.cast_exact::<PyBool>() {
        keys::push_bool(out, value.is_true());
        return Ok(());
    }
    let is_container = obj.is_exact_instance_of::<PyTuple>()
        || obj.is_exact_instance_of::<PyList>()
        || obj.is_exact_instance_of::<PyDict>()
        || obj.is_exact_instance_of::<PySet>()
        || obj.is_exact_instance_of::<PyFrozenSet>();
    if !is_container {
        return canon_pickled(obj, depth, out);
    }
    let depth = depth + 1;
    if depth > MAX_DEPTH {
        return Err(keys::too_deep().into());
    }
    if let Ok(tuple) = obj.cast_exact::<PyTuple>() {
        keys::push_header(out, tag::TUPLE, tuple.len(), "a sequence")?;
        for item in tuple.iter() {
            canon_into(&item, depth, out)?;
        }
    } else if let Ok(list) = obj.cast_exact::<PyList>() {
        keys::push_header(out, tag::LIST, list.len(), "a sequence")?;
        // Indexed iteration: safe even if pickling an item mutates the list.
        for item in list.iter() {
            canon_into(&item, depth, out)?;
        }
    } else if let Ok(dict) = obj.cast_exact::<PyDict>() {
        // A snapshot of the items: pickling a value may run code that mutates the dict.
        let items = dict.items();
        let mut pairs = Vec::with_capacity(items.len());
        for item in items.iter() {
            let (key, value) = item.extract::<(Bound<'_, PyAny>, Bound<'_, PyAny>)>()?;
            pairs.push((canon_of(&key, depth)?, canon_of(&value, depth)?));
        }
        keys::push_dict(out, pairs)?;
    } else {
        // set or frozenset; the generic iterator reports a concurrent change as an error.
        let mut members = Vec::new();
        for item in obj.try_iter()? {
            members.push(canon_of(&item?, depth)?);
        }
        keys::push_set(out, members)?;
    }
    Ok(())
}

/// `canon(obj)` on its own, to be sorted among its siblings.
fn canon_of(obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<Vec<u8>> {
    let mut canon = Vec::new();
    canon_into(obj, depth, &mut canon)?;
    Ok(canon)
}

fn canon_int(obj: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> PyResult<()> {
    if let Ok(value) = obj.extract::<i64>() {
        keys::push_i64(out, value);
        return Ok(());
    }
    // Beyond 64 bits: Python's own `to_bytes` gives the two's-complement bytes.
    let py = obj.py();
    let bit_length: usize = obj.call_method0(intern!(py, "bit_length"))?.extract()?;
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item(intern!(py, "signed"), true)?;
    let raw = obj.call_method(
        intern!(py, "to_bytes"),
        ((bit_length + 8) / 8, intern!(py, "little")),
        Some(&kwargs),
    )?;
    Ok(keys::push_int_bytes(
        out,
        raw.cast::<PyBytes>()?.as_bytes(),
    )?)
}

fn canon_str(value: &Bound<'_, PyString>, out: &mut Vec<u8>) -> PyResult<()> {
    match value.encode_utf8() {
        Ok(utf8) => Ok(keys::push_str(out, utf8.as_bytes())?),
        // Lone surrogates ('\ud800') are valid in a Python str but not in UTF-8;
        // `surrogatepass` encodes them as the reference does.
        Err(_) => {
            let py = value.py();
            let raw = value.call_method1(
                intern!(py, "encode"),
                (intern!(py, "utf-8"), intern!(py, "surrogatepass")),
            )?;
            Ok(keys::push_str(out, raw.cast::<PyBytes>()?.as_bytes())?)
        }
    }
}

fn canon_pickled(obj: &Bound<'_, PyAny>, depth: usize, out: &mut Vec<u8>) -> PyResult<()> {
    let py = obj.py();
    match pickle_dumps(py)?.call1((obj, PICKLE_PROTOCOL)) {
        Ok(raw) => Ok(keys::push_pickled(out, raw.cast::<PyBytes>()?.as_bytes())?),
        // As the reference: any Exception from pickling becomes the TypeError that
        // suggests key=, chained to it; BaseExceptions (KeyboardInterrupt) pass through.
        // A namedtuple (pandas' itertuples() rows) is keyed by its fields instead.
        Err(err) if err.is_instance_of::<PyException>(py) => {
            if let Some(fields) = named_tuple_fields(obj)? {
                return canon_named_tuple(obj, &fields, depth, out);
            }
            let type_name = obj.get_type().qualname()?;
            let reason = err.value(py).str()?;
            let key_err = PyErr::from(keys::unpicklable(&type_name.to_cow()?, &reason.to_cow()?));
            key_err.set_cause(py, Some(err));
            Err(key_err)
        }
        Err(err) => Err(err),
    }
}

/// The field names of a namedtuple (a tuple subclass whose `_fields`, a tuple of as many
/// exact strs as it has items, name them), else None.
fn named_tuple_fields<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyTuple>>> {
    let Ok(tuple) = obj.cast::<PyTuple>() else {
        return Ok(None);
    };
    let py = obj.py();
    let Ok(fields) = obj.get_type().getattr(intern!(py, "_fields")) else {
        return Ok(None);
    };
    let Ok(fields) = fields.cast_exact::<PyTuple>() else {
        return Ok(None);
    };
    if fields.len() != tuple.len()
        || !fields
            .iter()
            .all(|name| name.is_exact_instance_of::<PyString>())
    {
        return Ok(None);
    }
    Ok(Some(fields.clone()))
}

/// `N` + u32 count + `canon(name) + canon(value)` for each field, in order.
fn canon_named_tuple(
    obj: &Bound<'_, PyAny>,
    fields: &Bound<'_, PyTuple>,
    depth: usize,
    out: &mut Vec<u8>,
) -> PyResult<()> {
    let depth = depth + 1;
    if depth > MAX_DEPTH {
        return Err(keys::too_deep().into());
    }
    let tuple = obj.cast::<PyTuple>()?;
    keys::push_header(out, tag::NAMED_TUPLE, fields.len(), "a named tuple")?;
    for (name, value) in fields.iter().zip(tuple.iter()) {
        canon_str(name.cast_exact::<PyString>()?, out)?;
        canon_into(&value, depth, out)?;
    }
    Ok(())
}
