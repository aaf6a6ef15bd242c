//! The Python objects the core calls, imported once per interpreter and cached.
//!
//! Imported lazily, on first use: `snapperable._backend` imports this extension, and the
//! classes live in `snapperable._contract`, which need not be imported for key work.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

fn cached<'py>(
    py: Python<'py>,
    cell: &'py PyOnceLock<Py<PyAny>>,
    module: &str,
    name: &str,
) -> PyResult<&'py Bound<'py, PyAny>> {
    let value = cell.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.import(module)?.getattr(name)?.unbind())
    })?;
    Ok(value.bind(py))
}

macro_rules! python_attr {
    ($(#[$doc:meta])* $fn_name:ident => $module:literal . $name:literal) => {
        $(#[$doc])*
        pub fn $fn_name<'py>(py: Python<'py>) -> PyResult<&'py Bound<'py, PyAny>> {
            static CELL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
            cached(py, &CELL, $module, $name)
        }
    };
}

python_attr!(
    /// `pickle.dumps`, for input keys of arbitrary objects.
    pickle_dumps => "pickle"."dumps"
);
python_attr!(
    /// `pickle.loads`, for stored outputs.
    pickle_loads => "pickle"."loads"
);
python_attr!(
    /// The `VersionRow` NamedTuple, so Python code sees the types the contract names.
    version_row_class => "snapperable._contract"."VersionRow"
);
python_attr!(
    /// The `RowInfo` NamedTuple.
    row_info_class => "snapperable._contract"."RowInfo"
);
python_attr!(
    /// `json.loads`, to check the stored parts of a function version.
    json_loads => "json"."loads"
);
python_attr!(
    /// `map`, to run `pickle.loads` over many outputs from C, without a call per output
    /// crossing the binding.
    builtin_map => "builtins"."map"
);
