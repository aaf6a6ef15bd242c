"""Function fingerprints and "what changed" explanations (docs/architecture.md 5).

A version is the function's **logic and constants**, never the **state** of the objects
it touches: a restart of unchanged code must not redo finished work, and an edit of the
logic or of a constant must. A fingerprint is a set of named *parts* (each a hex digest,
except the literal ``python``, ``scheme`` and ``version`` parts) and one digest over all
of them, so that a change can be explained part by part.

Logic, by code:

- ``code``: the function's AST, read from its source file, with line/column numbers, the
  docstrings (its own and those of nested functions and classes) and its own name left
  out. Comments, formatting, blank lines, docstring edits, renaming the function and
  moving it in the file do not count. Decorators *are* kept: ``@retry(3)`` ->
  ``@retry(5)`` changes behaviour. Type annotations are kept too, as some libraries act
  on them at run time. Without source (REPL, ``exec``, a lambda that cannot be told
  apart from another one on its line) the code object is used instead: bytecode,
  constants, names, with the Python minor version as the ``python`` part; there a
  docstring edit does count.
- what the body reads from its module, found through the names of its code objects
  (nested ones too), and for the same-module functions and classes it reaches, what
  *they* read, recursively (each one once, so mutual recursion terminates): functions of
  the same module as ``helper <name>`` (their own code, defaults and closure), classes of
  the same module as ``class <name>`` (their source, with base classes of that module),
  modules as ``module <name>`` by module name only, functions or classes of other
  modules as ``imported <name>`` by module and qualified name only. Builtins are not
  hashed. A global holding an instance of a same-module class adds that class (and what
  its methods read).

Values (``global <name>``, ``defaults``, ``kwdefaults``, ``closure <name>``, ``partial
args``, ``partial keyword <name>``, ``attribute <name>``), by what they are:

- constants by value: ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``,
  ``bytes``, enum members, and tuples and frozensets of these (nested);
- plain data containers (``list``, ``dict``, ``set``, nested in any way) by value only
  in a module global named as a constant by PEP 8 (``PARAMS``, ``STOP_WORDS``): that is
  how configuration is written. Elsewhere (a lowercase global, a closure cell, a
  default, an attribute, a ``partial`` argument) a container is where memos and
  accumulators live (``cache = {}``, ``seen = []``): it counts by its type only;
- functions, bound methods and partials inside a value by their own fingerprint (a
  dispatch table ``HANDLERS = {"a": handle_a}`` counts the code of ``handle_a``);
  modules and classes inside a value by name;
- anything else is state (clients, sessions, RNGs, datetimes, argparse namespaces,
  loggers, locks, files, arrays, models): it counts by its type only, plus its class's
  code for a class of the module that holds it. Nothing is pickled, walked or even
  looked into for state, so a 400 MB model costs nothing.

Other callables: ``functools.partial`` adds ``partial args`` and one ``partial keyword
<name>`` part per keyword to the parts of what it wraps; a bound method is its function
plus ``class <name>`` (so that an edit to another method it calls counts) and one
``attribute <name>`` part per attribute of its instance (``Scorer("large").score`` is
another version than ``Scorer("small").score``); a callable object is its class's
``__call__`` plus the same; a C wrapper with ``__wrapped__`` (``functools.lru_cache``) is
what it wraps plus ``wrapper`` (its type); builtins and C classes (``str``, ``len``) are
their qualified name. Callables held *in* a value are digested the same way, with their
instance's attributes as one ``instance`` part and their keywords as one ``partial
keywords`` part. ``pinned(...)`` replaces all of this with ``{"version": ...}``.

Schemes. What the parts cover has changed once: scheme 1 (no ``scheme`` part) valued
every object it could pickle. A fingerprint carries, for each earlier scheme, its parts
as that scheme would have computed them, or None for a part where it would have
valued state, which this scheme ignores; ``changes_since`` compares a stored version of
an earlier scheme on what both cover, so upgrading snapperable never reprocesses an
unchanged function.

Known limits, documented for users (pin ``version=`` to take control):

- Configuration held in an object (``llm = ChatOpenAI(model=...)``, an argparse
  namespace, a global instance of your own class) counts by type only: say it with
  ``version=("v2", llm.model_name)``.
- A constant that changes on every run (a session token passed as a str ``partial``
  argument, a bound instance's random id attribute) counts, and so redoes work.
- An object of a same-module class held in a closure, default, attribute or ``partial``
  argument counts by its class's code; the module globals that only its methods read
  are not followed (they are for a global instance, and for a bound method's class).
- Functions and classes of *other* modules count by name only: editing an imported
  library or another file of your project is not seen. Neither are names used only in
  decorators, nor a class's base classes from other modules.
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
import enum
import functools
import inspect
import json
import linecache
import re
import struct
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from hashlib import blake2b
from itertools import islice
from typing import Any, Optional, TypeVar, Union, cast

from snapperable.keys import canon

SCHEME = 2  # what the parts cover; stored as the "scheme" part (none: scheme 1)
DIGEST_SIZE = 16  # bytes, so 32 hex characters
_MAX_DEPTH = 256  # nesting of containers walked by _Walk.value_bytes, as in keys.canon
_PYTHON = "{}.{}".format(*sys.version_info[:2])
_U32 = struct.Struct("<I")

_T = TypeVar("_T")
_FunctionNode = Union[ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda]

_WITH_DOCSTRING = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_BUILTIN_CALLABLES = (
    types.BuiltinFunctionType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
    types.ClassMethodDescriptorType,
)
_SCALARS = (bool, int, float, complex, str, bytes)  # with None and enum members: constants
_CONSTANT_NAME = re.compile(r"_*[A-Z][A-Z0-9_]*")  # PEP 8's constants: MODEL, _STOP_WORDS
_SKETCH_ITEMS = 6  # items of a container shown in a "what it covers" line
_SKETCH_CHARS = 80  # and the line's value cut to about this length


@dataclass(frozen=True)
class Fingerprint:
    """A function version: ``digest`` identifies it, ``parts`` explain a change.

    ``digest`` is hex and the same in every process and run; ``parts`` maps part names
    (``"code"``, ``"global MODEL"``, ...) to hex digests and is JSON-serialisable.
    ``covers`` says what each part covers and how (``"global MODEL = 'large'"``,
    ``"global client: type only"``). ``earlier`` holds, per earlier scheme, the parts as
    that scheme computes them, None for a part it computed from state.
    """

    digest: str
    parts: dict[str, str] = field(hash=False)
    covers: tuple[str, ...] = field(default=(), compare=False)
    earlier: Mapping[int, Mapping[str, Optional[str]]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def changes_since(self, old_parts: Mapping[str, str]) -> list[str]:
        """What changed since the version whose stored parts are ``old_parts``.

        Empty when this is the same version, also when ``old_parts`` come from an
        earlier scheme and all that both schemes cover is unchanged.
        """
        if "version" in old_parts or "version" in self.parts:
            return explain_change(old_parts, self.parts)
        old_scheme = scheme_of(old_parts)
        if old_scheme == SCHEME:
            return explain_change(old_parts, self.parts)
        view = self.earlier.get(old_scheme) if old_scheme is not None else None
        if view is None:
            return [f"recorded under fingerprint scheme {old_parts.get('scheme')}, which this "
                    f"snapperable (scheme {SCHEME}) cannot compare"]
        ignored = {name for name, digest in view.items() if digest is None}
        return explain_change(
            {name: digest for name, digest in old_parts.items() if name not in ignored},
            {name: digest for name, digest in view.items() if digest is not None},
        )

    def adopts(self, old_parts: Mapping[str, str]) -> bool:
        """Whether results stored under ``old_parts``, of an earlier scheme, are this version's."""
        old_scheme = scheme_of(old_parts)
        return (
            old_scheme is not None
            and old_scheme in self.earlier
            and "version" not in old_parts
            and not self.changes_since(old_parts)
        )


def scheme_of(parts: Mapping[str, str]) -> Optional[int]:
    """The fingerprint scheme that computed ``parts`` (None if it cannot be read)."""
    scheme = str(parts.get("scheme", "1"))
    return int(scheme) if scheme.isascii() and scheme.isdigit() else None


def fingerprint(fn: Callable[..., object]) -> Fingerprint:
    """The fingerprint of ``fn`` (see the module docstring for what it covers)."""
    if not callable(fn):
        raise TypeError(f"cannot fingerprint a {type(fn).__qualname__}: it is not callable")
    walk = _Walk()
    walk.stack.add(id(fn))
    found = walk.callable_parts(fn, top=True)
    parts = dict(found.digests, scheme=str(SCHEME))
    covers = tuple(name + found.how.get(name, "") for name in _ordered(found.digests) if name != "python")
    return Fingerprint(_digest_parts(parts), parts, covers, {1: found.scheme1})


def is_constant(value: object) -> bool:
    """Whether ``value`` is a constant: what counts by value wherever it is read."""
    return _constant(value, 0)


def pinned(version: object) -> Fingerprint:
    """The fingerprint of a version pinned by hand with ``version=...``: a str or a constant.

    A str is stored as it is (so the versions pinned by earlier releases are unchanged),
    another constant as its repr; ``version=2`` and ``version="2"`` are different versions.
    """
    if isinstance(version, str):
        parts = {"version": version}
    elif version is not None and is_constant(version):
        parts = {"version": _constant_repr(version), "version kind": type(version).__qualname__}
    else:
        raise TypeError(
            "version must be a str or a constant (None, bool, int, float, complex, str, "
            f"bytes, an enum member, or a tuple or frozenset of these), not "
            f"{type(version).__qualname__}"
        )
    return Fingerprint(_digest_parts(parts), parts, (f"version = {_version_text(parts)}",))


# --- explanations ------------------------------------------------------------------------

# Part name (or its first word, for "helper clean" and the like) -> (subject, verb), the
# verb agreeing with the subject in "... is new" / "... are new".
_SUBJECTS: dict[str, tuple[str, str]] = {
    "code": ("function body", "is"),
    "class": ("class body", "is"),
    "callable": ("callable", "is"),
    "defaults": ("default arguments", "are"),
    "kwdefaults": ("keyword-only default arguments", "are"),
    "instance": ("attributes of the bound instance", "are"),
    "wrapper": ("wrapper type", "is"),
    "partial args": ("positional arguments of the partial", "are"),
    "partial keywords": ("keyword arguments of the partial", "are"),
    "scheme": ("fingerprint scheme", "is"),
}
# Longest first, so that "partial keyword x" is not read as "partial" + "keyword x".
_NAMED_SUBJECTS: dict[str, str] = {
    "partial keyword": "keyword argument `{}` of the partial",
    "attribute": "attribute `{}` of the bound instance",
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
    old_version, new_version = _version_text(old_parts), _version_text(new_parts)
    if old_version != new_version:
        if old_version is None:
            return [f"version pinned to {new_version}"]
        if new_version is None:
            return [f"version {old_version} no longer pinned"]
        return [f"version {old_version} -> {new_version}"]

    sentences = []
    for name in _ordered(set(old_parts) | set(new_parts)):
        old, new = old_parts.get(name), new_parts.get(name)
        if old == new or name == "version kind":
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


def _ordered(names: Iterable[str]) -> list[str]:
    """Whole-object parts first (as in ``_SUBJECTS``), then named ones, by name."""
    return sorted(sorted(names), key=lambda n: n not in _SUBJECTS and n != "python")


def _version_text(parts: Mapping[str, str]) -> Optional[str]:
    """A pinned version as the user wrote it: ``'v2'``, ``('v2', 'gpt-4o')``."""
    version = parts.get("version")
    if version is None or "version kind" in parts:
        return version
    return repr(version)


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
    for kind, subject in _NAMED_SUBJECTS.items():
        if part.startswith(kind + " ") and len(part) > len(kind) + 1:
            return subject.format(part[len(kind) + 1 :]), "is"
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


def _mapping_bytes(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A dict's encoding (as ``keys.canon``'s) from its encoded keys and values."""
    ordered = sorted(pairs)
    return b"d" + _U32.pack(len(ordered)) + b"".join(k + v for k, v in ordered)


def _mapping_digest(encoded: Mapping[str, bytes]) -> str:
    """The digest of a dict of str keys and encoded values (keywords, keyword defaults)."""
    return _hex(_mapping_bytes((canon(name), data) for name, data in encoded.items()))


def _attributes_digest(encoded: Mapping[str, bytes]) -> str:
    """The digest of an instance's attributes: a dict of their digests."""
    return _hex(canon({name: _hex(data) for name, data in encoded.items()}))


# --- what a value is ---------------------------------------------------------------------

# How _Walk treats a value; value_bytes and sketch both follow this one classification.
_CONSTANT = "constant"  # canon's bytes (a tuple or frozenset subclass of constants too)
_SEQUENCE = "sequence"  # a list or tuple, walked
_MAPPING = "mapping"  # a dict, walked
_SET = "set"  # a set or frozenset, walked
_MODULE = "module"
_CALLABLE = "callable"  # a Python function, bound method or partial: its fingerprint
_NAMED = "named"  # a class or builtin: its qualified name
_STATE = "state"  # its type only


def _kind(value: object, containers: bool) -> str:
    """What ``value`` is to a fingerprint; ``containers``: list, dict, set by value."""
    kind = type(value)
    if kind is tuple:
        return _SEQUENCE
    if kind is frozenset:
        return _SET
    if kind is list or kind is dict or kind is set:
        if not containers:
            return _STATE
        return _SEQUENCE if kind is list else _MAPPING if kind is dict else _SET
    if value is None or isinstance(value, (_SCALARS, enum.Enum)):
        return _CONSTANT
    if isinstance(value, (tuple, frozenset)):  # a namedtuple: by canon (its pickle) if constant
        return _CONSTANT if _constant(value, 0) else _STATE
    if isinstance(value, types.ModuleType):
        return _MODULE
    if isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
        return _CALLABLE
    if isinstance(value, (type, *_BUILTIN_CALLABLES)):
        return _NAMED
    return _STATE


def _constant(value: object, depth: int) -> bool:
    if value is None or isinstance(value, (_SCALARS, enum.Enum)):
        return True
    if isinstance(value, (tuple, frozenset)) and depth < _MAX_DEPTH:
        return all(_constant(member, depth + 1) for member in value)
    return False


def _constant_repr(value: object) -> str:
    """``repr`` of a constant, the same in every process (a frozenset's members sorted)."""
    if isinstance(value, frozenset) and type(value) is frozenset:
        return "frozenset({" + ", ".join(sorted(_constant_repr(v) for v in value)) + "})"
    if type(value) is tuple:
        items = [_constant_repr(v) for v in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    return repr(value)


def _is_constant_name(name: str) -> bool:
    return _CONSTANT_NAME.fullmatch(name) is not None


# --- the walk ----------------------------------------------------------------------------


@dataclass
class _Parts:
    """Parts found so far: digests, how each is covered, and what scheme 1 would store."""

    digests: dict[str, str] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)  # " = 'large'", ": type only", ""
    scheme1: dict[str, Optional[str]] = field(default_factory=dict)

    def add(self, name: str, digest: str, how: str = "", exact: bool = True) -> None:
        """Record a part; ``exact``: scheme 1 computes the same digest for it."""
        self.digests[name] = digest
        self.how[name] = how
        self.scheme1[name] = digest if exact else None

    def update(self, other: "_Parts") -> None:
        self.digests.update(other.digests)
        self.how.update(other.how)
        self.scheme1.update(other.scheme1)


class _Walk:
    """One fingerprint's computation.

    ``stack`` holds the ids of the callables being digested (so that cycles end);
    ``typed`` is set when a value is counted by its type where scheme 1 valued it,
    which makes the part being computed one scheme 1 cannot be compared on.
    """

    def __init__(self) -> None:
        self.stack: set[int] = set()
        self.typed = False
        self.nested = 0  # > 0 inside a callable held in a value: nobody reads its "how"
        self.state_classes: dict[type, bytes] = {}  # type_bytes by class: a list of many

    def measured(self, compute: Callable[[], _T]) -> tuple[_T, bool]:
        """``compute()``, and whether scheme 1 computes the same (no state was met)."""
        outer, self.typed = self.typed, False
        try:
            return compute(), not self.typed
        finally:
            self.typed = outer or self.typed

    def add_value(self, parts: _Parts, name: str, value: object, module: Optional[str],
                  containers: bool = False) -> None:
        digest, exact = self.measured(lambda: self.value_digest(value, module, containers))
        parts.add(name, digest, self.how(value, containers), exact)

    def add_named_values(
        self,
        parts: _Parts,
        values: Mapping[str, object],
        module: Optional[str],
        whole: str,
        combine: Callable[[dict[str, bytes]], str],
        each: Optional[str] = None,
        exact: bool = True,
    ) -> None:
        """Values by name (keywords, attributes): with ``each``, one part ``<each> <name>``
        per value, else one part ``whole``; ``combine`` of their bytes is scheme 1's
        digest of ``whole`` (when ``exact`` and no state was met)."""
        encoded: dict[str, bytes] = {}
        for name, value in values.items():
            encoded[name], same = self.measured(lambda: self.value_bytes_or_type(value, module, False))
            exact = exact and same
        together = combine(encoded)
        if each is None:
            how = ": " + "; ".join(f"{name}{self.how(value, False)}" for name, value in values.items())
            parts.add(whole, together, how if values and not self.nested else "", exact)
            return
        for name, value in values.items():
            parts.add(f"{each} {name}", _hex(encoded[name]), self.how(value, False), False)
        parts.scheme1[whole] = together if exact else None

    # -- callables -----------------------------------------------------------------------

    def callable_parts(self, fn: object, top: bool) -> _Parts:
        """The parts of any callable; ``top``: ``fn`` is the fingerprinted function itself."""
        if isinstance(fn, types.FunctionType):
            return self.function_parts(fn)
        if isinstance(fn, functools.partial):
            return self.partial_parts(fn, top)
        if isinstance(fn, types.MethodType):
            owner = fn.__self__
            if isinstance(owner, type):  # a classmethod: bound to the class, no instance state
                return self.method_parts(fn.__func__, owner)
            parts = self.method_parts(fn.__func__, type(owner))
            self.instance_parts(parts, owner, top)
            return parts
        if isinstance(fn, type):
            parts = _Parts()
            parts.add("class", _class_digest(fn))
            functions = _class_functions(fn)
            if functions:
                namespace = functions[0].__globals__
                parts.update(self.module_parts(namespace, _class_codes(fn, namespace), fn))
            return parts
        if isinstance(fn, _BUILTIN_CALLABLES):
            parts = _Parts()
            parts.add("callable", _name_digest(fn), ": by name")
            owner = getattr(fn, "__self__", None)
            if owner is not None and not isinstance(owner, types.ModuleType):
                # "a,b".split: the str counts
                self.add_value(parts, "instance", owner, type(owner).__module__)
            return parts
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None and callable(wrapped):  # C wrappers such as functools.lru_cache
            parts = self.callable_parts(wrapped, top)
            parts.add("wrapper", _name_digest(type(fn)), ": by type")
            return parts
        # A callable object: its class's __call__ and its attributes.
        parts = self.method_parts(type(fn).__call__, type(fn))
        self.instance_parts(parts, fn, top)
        return parts

    def partial_parts(self, fn: functools.partial[object], top: bool) -> _Parts:
        """What ``fn`` wraps, its arguments and its keywords (one part each at the top)."""
        parts = self.callable_parts(fn.func, top)
        module = getattr(fn.func, "__module__", None)
        self.add_value(parts, "partial args", fn.args, module)
        each = "partial keyword" if top else None
        self.add_named_values(parts, fn.keywords, module, "partial keywords", _mapping_digest, each)
        return parts

    def method_parts(self, func: object, cls: type) -> _Parts:
        """A method ``func`` of ``cls``: its parts, plus the class it can call back into."""
        if isinstance(func, _BUILTIN_CALLABLES):  # the __call__ of a C class: the class names it
            parts = _Parts()
            parts.add("callable", _name_digest(cls), ": by name")
            return parts
        if not isinstance(func, types.FunctionType):  # say, a partial stored as __call__
            return self.callable_parts(func, False)
        parts = self.function_parts(func, _class_codes(cls, func.__globals__))
        parts.add(f"class {cls.__name__}", _class_digest(cls))
        return parts

    def instance_parts(self, parts: _Parts, obj: object, top: bool) -> None:
        """The attributes of the instance a method is bound to (rule 4 of docs/architecture.md 5).

        At the top, one part per attribute, standing for scheme 1's ``instance`` part
        (its digest over the attributes) when they are all constants; in a value, that
        one ``instance`` part.
        """
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict):  # scheme 1 digested these attribute by attribute, as here
            attributes: dict[str, object] = {str(name): value for name, value in state.items()}
        else:  # __slots__, or a C object: scheme 1 pickled it whole
            attributes = _slot_values(obj)
        each = "attribute" if top else None
        exact = isinstance(state, dict)
        self.add_named_values(parts, attributes, type(obj).__module__, "instance", _attributes_digest, each, exact)

    def function_parts(self, fn: types.FunctionType, extra_codes: Iterable[types.CodeType] = ()) -> _Parts:
        parts = self.own_parts(fn)
        parts.update(self.module_parts(fn.__globals__, [fn.__code__, *extra_codes], fn))
        return parts

    def own_parts(self, fn: types.FunctionType) -> _Parts:
        """Code, defaults and closure of ``fn``: everything but what it reads from its module."""
        parts = _Parts()
        module = fn.__globals__.get("__name__")
        source = _ast_digest(_source_node(fn.__code__, fn.__globals__))
        if source is not None:
            parts.add("code", source)
        else:
            parts.add("code", _hex(_code_bytes(fn.__code__)), f" (bytecode, Python {_PYTHON})")
            parts.add("python", _PYTHON)
        if fn.__defaults__ is not None:
            self.add_value(parts, "defaults", fn.__defaults__, module)
        if fn.__kwdefaults__:
            self.add_named_values(parts, fn.__kwdefaults__, module, "kwdefaults", _mapping_digest)
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # a cell not filled yet (a name assigned after the def)
                parts.add(f"closure {name}", _hex(b"empty cell"), ": empty")
                continue
            self.add_value(parts, f"closure {name}", value, module)
        return parts

    def module_parts(self, namespace: dict[str, Any], codes: list[types.CodeType], entry: object) -> _Parts:
        """What ``codes`` read from their module ``namespace``, following same-module helpers.

        All the functions and classes visited share ``namespace``, so one name means one
        value and their reads can be flattened into one set of parts: a constant read
        only by a helper explains itself as "global `X` changed", not just "helper
        changed".
        """
        module_name = namespace.get("__name__")
        parts = _Parts()
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
                    digest, exact = self.measured(lambda: _digest_parts(self.own_parts(helper).digests))
                    parts.add(f"helper {name}", digest, "", exact)
                    pending.append(helper.__code__)
                elif isinstance(value, type) and value.__module__ == module_name:
                    parts.add(f"class {name}", _class_digest(value))
                    pending.extend(_class_codes(value, namespace))
                elif isinstance(value, types.ModuleType):
                    parts.add(f"module {name}", _hex(value.__name__.encode()), ": by name")
                elif isinstance(value, (types.FunctionType, type, *_BUILTIN_CALLABLES)):
                    parts.add(f"imported {name}", _name_digest(value), ": by name")
                elif type(value).__module__ == module_name:
                    # client = Client(): Client's methods count as a class part, so the
                    # global's own digest leaves the class out (module None)
                    cls = type(value)
                    self.add_value(parts, f"global {name}", value, None)
                    parts.add(f"class {cls.__name__}", _class_digest(cls))
                    pending.extend(_class_codes(cls, namespace))
                else:
                    self.add_value(parts, f"global {name}", value, module_name, _is_constant_name(name))
        return parts

    # -- values --------------------------------------------------------------------------

    def value_digest(self, value: object, module: Optional[str], containers: bool) -> str:
        return _hex(self.value_bytes_or_type(value, module, containers))

    def value_bytes_or_type(self, value: object, module: Optional[str], containers: bool) -> bytes:
        try:
            return self.value_bytes(value, module, containers, 0)
        except TypeError:  # nested too deeply, or a constant canon cannot pickle (a local enum)
            return self.type_bytes(value, module)

    def value_bytes(self, value: object, module: Optional[str], containers: bool, depth: int) -> bytes:
        """The bytes a value counts by.

        Constants and walked containers give exactly ``keys.canon``'s bytes (and so
        scheme 1's); the extra tags (c, m, q, y) are not canon's.
        """
        if depth > _MAX_DEPTH:
            raise TypeError("nested too deeply")
        kind = _kind(value, containers)
        if kind == _CONSTANT:
            return canon(value)
        inner = functools.partial(self.value_bytes, module=module, containers=containers, depth=depth + 1)
        if kind == _SEQUENCE:
            items = [inner(v) for v in cast("list[object] | tuple[object, ...]", value)]
            return (b"l" if type(value) is list else b"t") + _U32.pack(len(items)) + b"".join(items)
        if kind == _MAPPING:
            return _mapping_bytes((inner(k), inner(v)) for k, v in cast("dict[object, object]", value).items())
        if kind == _SET:
            members = sorted(inner(v) for v in cast("set[object] | frozenset[object]", value))
            return b"S" + _U32.pack(len(members)) + b"".join(members)
        if kind == _MODULE:
            return b"m" + cast(types.ModuleType, value).__name__.encode()
        if kind == _CALLABLE:
            return b"c" + self.callable_digest(value).encode()
        if kind == _NAMED:
            return b"q" + _qualified_name(value).encode()
        return self.type_bytes(value, module)

    def type_bytes(self, value: object, module: Optional[str]) -> bytes:
        """State: its type, and its class's code when that class is of ``module``."""
        self.typed = True
        cls = type(value)
        same_module = module is not None and cls.__module__ == module
        data = self.state_classes.get(cls) if same_module else None
        if data is None:
            data = b"y" + _qualified_name(cls).encode()
            if same_module:
                data += _class_digest(cls).encode()
                self.state_classes[cls] = data
        return data

    def callable_digest(self, fn: object) -> str:
        """The fingerprint digest of a callable held in a value; cycles end in a placeholder."""
        if id(fn) in self.stack:
            return _hex(b"recursive reference")
        self.stack.add(id(fn))
        self.nested += 1
        try:
            return _digest_parts(self.callable_parts(fn, top=False).digests)
        finally:
            self.nested -= 1
            self.stack.discard(id(fn))

    # -- what a value's part covers, for people ------------------------------------------

    def how(self, value: object, containers: bool) -> str:
        """`` = <value>`` for what counts by value, ``: type only`` for state."""
        if self.nested:
            return ""
        if _kind(value, containers) == _STATE:
            return ": type only"
        text = _sketch(value, containers, 0)
        return " = " + (text if len(text) <= _SKETCH_CHARS else text[: _SKETCH_CHARS - 3] + "...")


def _sketch(value: object, containers: bool, depth: int) -> str:
    """A short repr of what a value counts by: state shows as ``<Type>``, never its repr."""
    kind = _kind(value, containers)
    if kind == _CONSTANT:
        if isinstance(value, (str, bytes)) and len(value) > _SKETCH_CHARS:
            return repr(value[:_SKETCH_CHARS]) + "..."
        if isinstance(value, (tuple, frozenset)):  # a subclass (exact ones are walked): a namedtuple
            return type(value).__name__ + _sketch_items(tuple(value), containers, depth)
        return repr(value)
    if kind in (_SEQUENCE, _MAPPING, _SET):
        return _sketch_items(value, containers, depth)
    if kind == _MODULE:
        return f"<module {cast(types.ModuleType, value).__name__}>"
    if kind == _CALLABLE:
        return f"<function {getattr(value, '__qualname__', None) or type(value).__qualname__}>"
    if kind == _NAMED:
        return f"<{_qualified_name(value)}>"
    return f"<{type(value).__qualname__}>"


_BRACKETS: dict[type, tuple[str, str]] = {
    list: ("[", "]"),
    tuple: ("(", ")"),
    dict: ("{", "}"),
    set: ("{", "}"),
    frozenset: ("frozenset({", "})"),
}


def _sketch_items(value: Any, containers: bool, depth: int) -> str:
    """A list, tuple, dict, set or frozenset, its first few items (a set's in no order)."""
    kind = type(value)
    opening, closing = _BRACKETS[kind]
    if not value and kind in (set, frozenset):
        return f"{kind.__name__}()"
    if depth >= 3:
        return opening + "..." + closing
    if kind is dict:
        shown = [
            f"{_sketch(k, containers, depth + 1)}: {_sketch(v, containers, depth + 1)}"
            for k, v in islice(value.items(), _SKETCH_ITEMS)
        ]
    else:
        shown = [_sketch(v, containers, depth + 1) for v in islice(value, _SKETCH_ITEMS)]
    if len(value) > _SKETCH_ITEMS:
        shown.append("...")
    return opening + ", ".join(shown) + ("," if kind is tuple and len(value) == 1 else "") + closing


def _slot_values(obj: object) -> dict[str, object]:
    """The attributes of an object without ``__dict__``, from the ``__slots__`` of its classes."""
    values: dict[str, object] = {}
    for klass in type(obj).__mro__:
        slots = vars(klass).get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in values and name not in ("__dict__", "__weakref__"):
                try:
                    values[name] = getattr(obj, name)
                except AttributeError:  # a slot never assigned
                    continue
    return values


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
