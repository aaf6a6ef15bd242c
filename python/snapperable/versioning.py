"""Function fingerprints and "what changed" explanations (docs/architecture.md 5).

A fingerprint changes when the behaviour of ``fn`` can change, and not otherwise. It is a
set of named *parts* (each a hex digest, except the literal ``python`` and ``version``
parts) and one digest over all of them, so a change can be explained part by part.

What a plain Python function's parts cover:

- ``code``: the function's AST, read from its source file, with line/column numbers, the
  docstrings (its own and those of nested functions and classes) and its own name left
  out. Comments, formatting, blank lines, docstring edits, renaming the function and
  moving it in the file do not count. Decorators *are* kept: ``@retry(3)`` ->
  ``@retry(5)`` changes behaviour. Type annotations are kept too, as some libraries act
  on them at run time. Without source (REPL, ``exec``, a lambda that cannot be told
  apart from another one on its line) the code object is used instead: bytecode,
  constants, names, with the Python minor version as the ``python`` part; there a
  docstring edit does count.
- ``defaults``, ``kwdefaults`` and ``closure <name>``: by value.
- what the body reads from its module, found through the names of its code objects
  (nested ones too), and for the same-module functions and classes it reaches, what
  *they* read, recursively (each one once, so mutual recursion terminates): functions of
  the same module as ``helper <name>`` (their own code, defaults and closure), classes of
  the same module as ``class <name>`` (their source, with base classes of that module),
  other values as ``global <name>`` by value, modules as ``module <name>`` by module
  name only, and functions or classes of other modules as ``imported <name>`` by
  module and qualified name only. Builtins are not hashed.

Other callables: ``functools.partial`` adds ``partial args`` and ``partial keywords`` to
the parts of what it wraps; a bound method is its function plus ``class <name>`` (so
that an edit to another method it calls counts) and ``instance``, the state of the
object it is bound to (attribute by attribute); a callable object is its class's
``__call__`` plus the same two; a C wrapper with ``__wrapped__``
(``functools.lru_cache``) is what it wraps plus ``wrapper`` (its type); builtins and C
classes (``str``, ``len``) are their qualified name. ``pinned("v3")`` replaces all of
this with ``{"version": "v3"}``.

Values are digested with ``keys.canon`` (so dict and set order does not matter), walking
lists, tuples, dicts and sets by hand so that Python functions inside them (a dispatch
table, a default ``key=helper``) are fingerprinted by content rather than pickled by
name.

Known limits, documented for users (pin ``version=`` to take control):

- A value's digest is only as stable as its pickle (as for input keys); a value that
  can be neither encoded nor pickled (a lock, an open file) counts by its type only, so
  a change of its state goes unnoticed. A large global (a model) is pickled each time a
  fingerprint is computed.
- Functions and classes of *other* modules count by name only: editing an imported
  library or another file of your project is not seen. Neither are names used only in
  decorators, nor classes held in defaults or closures (by name), nor a class's base
  classes from other modules.
- Names are taken from the code objects, which also list attribute names: a global
  that happens to share its name with an attribute the body reads counts too (a change
  of it may redo work needlessly, never miss a change).
- The source is read from disk when the fingerprint is computed (as ``inspect`` does):
  editing the file after importing it and before computing the fingerprint is seen as
  a change.
- Part digests do not depend on the Python version on the source path (the AST text
  leaves out empty optional fields, which newer Pythons add), but they do on the
  bytecode path.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import linecache
import struct
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any, Optional, Union

from snapperable.keys import canon

DIGEST_SIZE = 16  # bytes, so 32 hex characters
_MAX_DEPTH = 256  # nesting of containers walked by _value_bytes, as in keys.canon
_PYTHON = "{}.{}".format(*sys.version_info[:2])
_U32 = struct.Struct("<I")

_FunctionNode = Union[ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda]

_WITH_DOCSTRING = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_BUILTIN_CALLABLES = (
    types.BuiltinFunctionType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
    types.ClassMethodDescriptorType,
)


@dataclass(frozen=True)
class Fingerprint:
    """A function version: ``digest`` identifies it, ``parts`` explain a change.

    ``digest`` is hex and the same in every process and run; ``parts`` maps part names
    (``"code"``, ``"global MODEL"``, ...) to hex digests and is JSON-serialisable.
    """

    digest: str
    parts: dict[str, str] = field(hash=False)


def fingerprint(fn: Callable[..., object]) -> Fingerprint:
    """The fingerprint of ``fn`` (see the module docstring for what it covers)."""
    if not callable(fn):
        raise TypeError(f"cannot fingerprint a {type(fn).__qualname__}: it is not callable")
    parts = _callable_parts(fn, {id(fn)})
    return Fingerprint(_digest_parts(parts), parts)


def pinned(version: str) -> Fingerprint:
    """The fingerprint of a version pinned by hand with ``version=...``."""
    if not isinstance(version, str):
        raise TypeError(f"version must be a str, not {type(version).__qualname__}")
    parts = {"version": version}
    return Fingerprint(_digest_parts(parts), parts)


# --- explanations ------------------------------------------------------------------------

# Part name (or its first word, for "helper clean" and the like) -> (subject, verb), the
# verb agreeing with the subject in "... is new" / "... are new".
_SUBJECTS: dict[str, tuple[str, str]] = {
    "code": ("function body", "is"),
    "class": ("class body", "is"),
    "callable": ("callable", "is"),
    "defaults": ("default arguments", "are"),
    "kwdefaults": ("keyword-only default arguments", "are"),
    "instance": ("state of the bound instance", "is"),
    "wrapper": ("wrapper type", "is"),
    "partial args": ("positional arguments of the partial", "are"),
    "partial keywords": ("keyword arguments of the partial", "are"),
}
_NAMED_SUBJECTS: dict[str, str] = {
    "closure": "closure value `{}`",
    "global": "global `{}`",
    "helper": "helper `{}`",
    "class": "class `{}`",
    "module": "module `{}`",
    "imported": "imported name `{}`",
}


def explain_change(old_parts: Mapping[str, str], new_parts: Mapping[str, str]) -> list[str]:
    """Sentences that say what changed from ``old_parts`` to ``new_parts``.

    Empty when they are equal. Whole-object parts ("function body changed") come first,
    then named ones ("helper `clean` changed") in name order.
    """
    old_version, new_version = old_parts.get("version"), new_parts.get("version")
    if old_version != new_version:
        if old_version is None:
            return [f"version pinned to {new_version!r}"]
        if new_version is None:
            return [f"version {old_version!r} no longer pinned"]
        return [f"version {old_version!r} -> {new_version!r}"]

    sentences = []
    names = sorted(set(old_parts) | set(new_parts))
    for name in sorted(names, key=lambda n: n not in _SUBJECTS and n != "python"):
        old, new = old_parts.get(name), new_parts.get(name)
        if old == new:
            continue
        if name == "python":
            sentences.append(_python_sentence(old, new))
            continue
        subject, verb = _subject(name)
        if old is None:
            sentences.append(f"{subject} {verb} new")
        elif new is None:
            sentences.append(f"{subject} no longer used")
        else:
            sentences.append(f"{subject} changed")
    return sentences


def _python_sentence(old: Optional[str], new: Optional[str]) -> str:
    """The "python" part is there only when the bytecode, not the source, was compared."""
    if old is None:
        return "source no longer found: bytecode compared instead"
    if new is None:
        return "source found: compared instead of bytecode"
    return f"Python version changed ({old} -> {new})"


def _subject(part: str) -> tuple[str, str]:
    if part in _SUBJECTS:
        return _SUBJECTS[part]
    kind, _, name = part.partition(" ")
    if kind in _NAMED_SUBJECTS and name:
        return _NAMED_SUBJECTS[kind].format(name), "is"
    return f"`{part}`", "is"


# --- digests -----------------------------------------------------------------------------


def _hex(data: bytes) -> str:
    return blake2b(data, digest_size=DIGEST_SIZE).hexdigest()


def _digest_parts(parts: Mapping[str, str]) -> str:
    return _hex(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode())


def _qualified_name(obj: object) -> str:
    module = getattr(obj, "__module__", None) or type(obj).__module__
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{name}"


def _name_digest(obj: object) -> str:
    return _hex(b"name:" + _qualified_name(obj).encode())


# --- callables ---------------------------------------------------------------------------


def _callable_parts(fn: object, stack: set[int]) -> dict[str, str]:
    """The parts of any callable; ``stack`` holds the ids of callables being digested."""
    if isinstance(fn, types.FunctionType):
        return _function_parts(fn, stack)
    if isinstance(fn, functools.partial):
        parts = _callable_parts(fn.func, stack)
        parts["partial args"] = _value_digest(fn.args, stack)
        parts["partial keywords"] = _value_digest(fn.keywords, stack)
        return parts
    if isinstance(fn, types.MethodType):
        owner = fn.__self__
        if isinstance(owner, type):  # a classmethod: bound to the class, no instance state
            return _method_parts(fn.__func__, owner, stack)
        parts = _method_parts(fn.__func__, type(owner), stack)
        parts["instance"] = _instance_digest(owner, stack)
        return parts
    if isinstance(fn, type):
        parts = {"class": _class_digest(fn)}
        functions = _class_functions(fn)
        if functions:
            namespace = functions[0].__globals__
            parts.update(_module_parts(namespace, _class_codes(fn, namespace), fn, stack))
        return parts
    if isinstance(fn, _BUILTIN_CALLABLES):
        parts = {"callable": _name_digest(fn)}
        owner = getattr(fn, "__self__", None)
        if owner is not None and not isinstance(owner, types.ModuleType):
            parts["instance"] = _instance_digest(owner, stack)  # "a,b".split: the str counts
        return parts
    wrapped = getattr(fn, "__wrapped__", None)
    if wrapped is not None and callable(wrapped):  # C wrappers such as functools.lru_cache
        parts = _callable_parts(wrapped, stack)
        parts["wrapper"] = _name_digest(type(fn))
        return parts
    # A callable object: its class's __call__ and its state.
    parts = _method_parts(type(fn).__call__, type(fn), stack)
    parts["instance"] = _instance_digest(fn, stack)
    return parts


def _method_parts(func: object, cls: type, stack: set[int]) -> dict[str, str]:
    """A method ``func`` of ``cls``: its parts, plus the class it can call back into."""
    if isinstance(func, _BUILTIN_CALLABLES):  # the __call__ of a C class: the class names it
        return {"callable": _name_digest(cls)}
    if not isinstance(func, types.FunctionType):  # say, a partial stored as __call__
        return _callable_parts(func, stack)
    parts = _function_parts(func, stack, _class_codes(cls, func.__globals__))
    parts[f"class {cls.__name__}"] = _class_digest(cls)
    return parts


def _function_parts(
    fn: types.FunctionType, stack: set[int], extra_codes: Iterable[types.CodeType] = ()
) -> dict[str, str]:
    parts = _own_parts(fn, stack)
    parts.update(_module_parts(fn.__globals__, [fn.__code__, *extra_codes], fn, stack))
    return parts


def _own_parts(fn: types.FunctionType, stack: set[int]) -> dict[str, str]:
    """Code, defaults and closure of ``fn``: everything but what it reads from its module."""
    source = _ast_digest(_source_node(fn.__code__, fn.__globals__))
    if source is not None:
        parts = {"code": source}
    else:
        parts = {"code": _hex(_code_bytes(fn.__code__)), "python": _PYTHON}
    if fn.__defaults__ is not None:
        parts["defaults"] = _value_digest(fn.__defaults__, stack)
    if fn.__kwdefaults__:
        parts["kwdefaults"] = _value_digest(fn.__kwdefaults__, stack)
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # a cell not filled yet (a name assigned after the def)
            parts[f"closure {name}"] = _hex(b"empty cell")
            continue
        parts[f"closure {name}"] = _value_digest(value, stack)
    return parts


def _module_parts(
    namespace: dict[str, Any], codes: list[types.CodeType], entry: object, stack: set[int]
) -> dict[str, str]:
    """What ``codes`` read from their module ``namespace``, following same-module helpers.

    All the functions and classes visited share ``namespace``, so one name means one
    value and their reads can be flattened into one set of parts: a constant read only
    by a helper explains itself as "global `X` changed", not just "helper changed".
    """
    module_name = namespace.get("__name__")
    parts: dict[str, str] = {}
    seen_names: set[str] = set()
    pending = list(codes)
    while pending:
        for name in _code_names(pending.pop()):
            if name in seen_names or name not in namespace:  # not there: a builtin, or an attribute
                continue
            seen_names.add(name)
            value = namespace[name]
            if value is entry:
                continue
            helper = _same_module_function(value, namespace)
            if helper is not None:
                parts[f"helper {name}"] = _digest_parts(_own_parts(helper, stack))
                pending.append(helper.__code__)
            elif isinstance(value, type) and value.__module__ == module_name:
                parts[f"class {name}"] = _class_digest(value)
                pending.extend(_class_codes(value, namespace))
            elif isinstance(value, types.ModuleType):
                parts[f"module {name}"] = _hex(value.__name__.encode())
            elif isinstance(value, (types.FunctionType, type, *_BUILTIN_CALLABLES)):
                parts[f"imported {name}"] = _name_digest(value)
            else:
                parts[f"global {name}"] = _value_digest(value, stack)
                cls = type(value)
                if cls.__module__ == module_name:  # MODEL = Model(): Model's methods count
                    parts[f"class {cls.__name__}"] = _class_digest(cls)
                    pending.extend(_class_codes(cls, namespace))
    return parts


def _same_module_function(value: object, namespace: dict[str, Any]) -> Optional[types.FunctionType]:
    """The function behind ``value`` (through decorators) if it is defined in ``namespace``."""
    if not callable(value):
        return None
    try:
        inner = inspect.unwrap(value)
    except ValueError:  # a __wrapped__ cycle
        return None
    if isinstance(inner, types.FunctionType) and inner.__globals__ is namespace:
        return inner
    return None


def _code_names(code: types.CodeType) -> list[str]:
    """Global (and attribute) names read by ``code`` and the code objects nested in it."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_code_names(const))
    return names


# --- classes -----------------------------------------------------------------------------


def _class_functions(cls: type) -> list[types.FunctionType]:
    """The Python functions defined in the body of ``cls`` (methods, properties...)."""
    functions: list[object] = []
    for member in vars(cls).values():
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if isinstance(member, property):
            functions.extend(f for f in (member.fget, member.fset, member.fdel) if f)
        elif isinstance(member, types.FunctionType):
            functions.append(member)
    return [f for f in functions if isinstance(f, types.FunctionType)]


def _class_codes(cls: type, namespace: dict[str, Any]) -> list[types.CodeType]:
    """Code of the methods of ``cls`` whose globals are ``namespace`` (and so its names)."""
    return [f.__code__ for f in _class_functions(cls) if f.__globals__ is namespace]


def _class_digest(cls: type) -> str:
    """``cls`` and its base classes of the same module, by source (else by bytecode)."""
    bodies = [
        _class_body(klass)
        for klass in cls.__mro__
        if klass is cls or (klass.__module__ == cls.__module__ and klass is not object)
    ]
    return _hex(canon(bodies))


def _class_body(cls: type) -> str:
    source = _ast_digest(_class_node(cls))
    if source is None:  # no source: builtins, exec'd code
        methods = sorted((f.__name__, _hex(_code_bytes(f.__code__))) for f in _class_functions(cls))
        return _hex(canon((_qualified_name(cls), _PYTHON if methods else "", methods)))
    return source


def _class_node(cls: type) -> Optional[ast.ClassDef]:
    """The ClassDef of ``cls``, found by qualified name in its file (None if not one)."""
    # A method defined in the class body names the file even where the module has no
    # __file__ (a notebook's __main__).
    prefix = cls.__qualname__ + "."
    methods = [f for f in _class_functions(cls) if f.__qualname__.startswith(prefix)]
    if methods:
        filename, namespace = methods[0].__code__.co_filename, methods[0].__globals__
    else:
        module = sys.modules.get(cls.__module__)
        module_file = getattr(module, "__file__", None)
        if module is None or not isinstance(module_file, str):
            return None
        filename, namespace = module_file, vars(module)
    candidates = _source_index(filename, namespace).classes.get(cls.__qualname__, [])
    return candidates[0] if len(candidates) == 1 else None


# --- source ------------------------------------------------------------------------------


@dataclass
class _SourceIndex:
    """Definitions in one source file, keyed as their runtime objects identify them."""

    functions: dict[tuple[str, int], list[_FunctionNode]]  # by (co_name, co_firstlineno)
    classes: dict[str, list[ast.ClassDef]]  # by __qualname__


def _source_node(code: types.CodeType, namespace: dict[str, Any]) -> Optional[_FunctionNode]:
    """The AST node that compiled to ``code``, or None if there is no (unambiguous) one.

    The whole file is parsed, rather than the block ``inspect.getsource`` returns: for a
    lambda inside a larger expression that block is not valid Python on its own.
    """
    index = _source_index(code.co_filename, namespace)
    candidates = index.functions.get((code.co_name, code.co_firstlineno), [])
    if code.co_name == "<lambda>":
        wanted = list(code.co_varnames[: _argument_count(code)])
        candidates = [n for n in candidates if _argument_names(n.args) == wanted]
    return candidates[0] if len(candidates) == 1 else None


def _source_index(filename: str, namespace: dict[str, Any]) -> _SourceIndex:
    """The index of ``filename`` as it is now on disk (or in linecache, for a notebook)."""
    linecache.checkcache(filename)
    # namespace lets linecache ask the module's loader (zip imports, ...)
    return _index_source("".join(linecache.getlines(filename, namespace)))


@functools.lru_cache(maxsize=32)
def _index_source(text: str) -> _SourceIndex:
    index = _SourceIndex({}, {})
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # also the empty text of a file that is not there
        return index
    # Iterative, as deep expressions would overflow a recursive walk.
    pending: list[tuple[ast.AST, str]] = [(tree, "")]
    while pending:
        node, prefix = pending.pop()  # prefix: the qualified name of the enclosing scope
        for child in ast.iter_child_nodes(node):
            inner = prefix
            if isinstance(child, ast.Lambda):
                index.functions.setdefault(("<lambda>", child.lineno), []).append(child)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # co_firstlineno of a decorated function is the line of its first decorator
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                index.functions.setdefault((child.name, first), []).append(child)
                inner = f"{prefix}{child.name}.<locals>."
            elif isinstance(child, ast.ClassDef):
                index.classes.setdefault(prefix + child.name, []).append(child)
                inner = f"{prefix}{child.name}."
            pending.append((child, inner))
    return index


def _argument_count(code: types.CodeType) -> int:
    count = code.co_argcount + code.co_kwonlyargcount
    count += bool(code.co_flags & inspect.CO_VARARGS) + bool(code.co_flags & inspect.CO_VARKEYWORDS)
    return count


def _argument_names(args: ast.arguments) -> list[str]:
    """Argument names in co_varnames order: positional, keyword-only, *args, **kwargs."""
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return names


def _ast_digest(node: Optional[ast.AST]) -> Optional[str]:
    """The digest of a definition's normalised AST; None to fall back to the bytecode."""
    if node is None:
        return None
    try:
        return _hex(_dump(node, top=True).encode())
    except RecursionError:  # an expression nested thousands deep (a generated formula)
        return None


def _dump(node: ast.AST, top: bool = False) -> str:
    """Like ``ast.dump(node, include_attributes=False)``, normalised.

    Leaves out the docstrings, the top node's own name, and fields that are None or
    empty: Pythons differ in which of those they print (3.12 adds ``type_params=[]``,
    3.13 omits empty fields), and the digest must not change with the Python version.
    """
    fields = []
    for name, value in ast.iter_fields(node):
        if top and name == "name":
            continue
        if name == "body" and isinstance(node, _WITH_DOCSTRING):
            value = _without_docstring(value)
        if value is None or (isinstance(value, list) and not value):
            continue
        fields.append(f"{name}={_dump_value(value)}")
    return f"{type(node).__name__}({', '.join(fields)})"


def _dump_value(value: object) -> str:
    if isinstance(value, ast.AST):
        return _dump(value)
    if isinstance(value, list):
        return "[" + ", ".join(_dump_value(v) for v in value) + "]"
    return repr(value)


def _without_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    first = body[0] if body else None
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return body[1:]
    return body


def _code_bytes(code: types.CodeType) -> bytes:
    """The behaviour of a code object: everything but its names, file and line numbers."""
    consts = tuple(
        ("code", _code_bytes(c)) if isinstance(c, types.CodeType) else c for c in code.co_consts
    )
    return canon(
        (
            code.co_code,
            getattr(code, "co_exceptiontable", b""),  # Python 3.11+: try/except targets
            consts,
            code.co_names,
            code.co_varnames,
            code.co_freevars,
            code.co_cellvars,
            code.co_argcount,
            code.co_posonlyargcount,
            code.co_kwonlyargcount,
            code.co_flags,
        )
    )


# --- values ------------------------------------------------------------------------------


def _instance_digest(obj: object, stack: set[int]) -> str:
    """The state of an instance: its attributes if it has a ``__dict__``, else its pickle.

    Each attribute is digested on its own, so one that cannot be pickled (a connection)
    falls back to its type without hiding changes in the others.
    """
    state = getattr(obj, "__dict__", None)
    if not isinstance(state, dict):
        return _value_digest(obj, stack)
    return _hex(canon({str(name): _value_digest(value, stack) for name, value in state.items()}))


def _value_digest(value: object, stack: set[int]) -> str:
    try:
        return _hex(_value_bytes(value, stack, 0))
    except TypeError:
        # Neither canon nor pickle can encode it (a lock, an open file, a container of
        # one): identify it by its type only, so a change of its state goes unnoticed.
        return _hex(b"type:" + _qualified_name(type(value)).encode())


def _value_bytes(value: object, stack: set[int], depth: int) -> bytes:
    """``keys.canon(value)``, except that callables and modules inside are not pickled.

    Plain data gives exactly canon's bytes; the extra tags (c, m, q) are not canon's.
    """
    if depth > _MAX_DEPTH:
        raise TypeError("nested too deeply")
    kind = type(value)
    if kind is list or kind is tuple:
        items = [_value_bytes(v, stack, depth + 1) for v in value]  # type: ignore[attr-defined]
        return (b"l" if kind is list else b"t") + _U32.pack(len(items)) + b"".join(items)
    if kind is dict:
        pairs = sorted(
            (_value_bytes(k, stack, depth + 1), _value_bytes(v, stack, depth + 1))
            for k, v in value.items()  # type: ignore[attr-defined]
        )
        return b"d" + _U32.pack(len(pairs)) + b"".join(k + v for k, v in pairs)
    if kind is set or kind is frozenset:
        members = sorted(
            _value_bytes(v, stack, depth + 1) for v in value  # type: ignore[attr-defined]
        )
        return b"S" + _U32.pack(len(members)) + b"".join(members)
    if isinstance(value, types.ModuleType):
        return b"m" + value.__name__.encode()
    if isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
        return b"c" + _callable_digest(value, stack).encode()
    if isinstance(value, (type, *_BUILTIN_CALLABLES)):
        return b"q" + _qualified_name(value).encode()
    return canon(value)


def _callable_digest(fn: object, stack: set[int]) -> str:
    """The fingerprint digest of a callable held in a value; cycles end in a placeholder."""
    if id(fn) in stack:
        return _hex(b"recursive reference")
    stack.add(id(fn))
    try:
        return _digest_parts(_callable_parts(fn, stack))
    finally:
        stack.discard(id(fn))
