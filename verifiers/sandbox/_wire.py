"""Values and calls between the test harness and the process that runs the program under test.

The harness (trusted) and the program (untrusted) live in two processes. What
crosses between them is *data*, written as tagged JSON: ``None``, bools, ints,
floats, strings, lists, and, tagged, tuples ``{"T": [...]}``, sets ``{"S"}``,
frozensets ``{"Z"}``, dicts ``{"D": [[k, v], ...]}``, bytes ``{"B": hex}``,
bytearrays ``{"A"}``, complex ``{"C": [re, im]}``, non-finite floats ``{"F"}``
and builtins by name ``{"N": "len"}``. Whatever the program returns, the
harness rebuilds it from that text as exact built-in types, so no method the
program defined (``__eq__`` included) ever runs where results are judged.
Other objects stay where they are and cross as handles (``{"H": [id,
callable]}``, or ``{"R": id}`` for an object of the receiver's own): the
receiver gets a :class:`Remote`, and every use of it (a call, an attribute,
iteration, ``len``...) is a request answered by the side that owns it.

Each side serves the other's requests while it waits for its own answer, so a
function of the tests passed to the program can be called back. The harness
serves only calls of functions the tests defined; the program's side serves
everything on its own objects.

Runs inside the sandbox (its source comes first in the harness's there) and on the
host, which reads the values the harness reports with :func:`decode`. Standard
library only, and no ``json``: its import pulls in ``re``, which costs more than
a short run; the C scanner of ``_json`` parses the same text.
"""

import builtins
import os

try:
    import _json
except ImportError:  # an interpreter without the C accelerator: the pure-Python parser
    _json = None

MESSAGE_CAP = 64 << 20  # bytes; a larger message ends the exchange
_DEPTH = 200
_SHORT_DIGITS = 4000  # int() refuses longer digit strings by default (CVE-2020-10735 guard)
_BASES = (int, float, str, bytes, bytearray, tuple, list, dict, frozenset, set, complex)


class WireError(Exception):
    """A message that cannot be read or sent (malformed, too deep, too large)."""


class PeerGone(Exception):
    """The other side went away, or the exchange with it broke (it can no longer answer)."""


class CallTimeout(BaseException):
    """A call ran past its budget; a BaseException so that ``except Exception`` in a program keeps out."""


# ------------------------------------------------------------------ encoding


def encode(value, export=None):
    """JSON text for ``value``; other objects go through ``export(obj)`` (a handle) or raise TypeError."""
    out = []
    _put(value, out, export, 0)
    return "".join(out)


def _string(text):
    return _json.encode_basestring_ascii(text) if _json else _ascii_string(text)


def _ascii_string(text):
    escaped = []
    for char in text:
        code = ord(char)
        if char in '"\\' or code < 0x20 or code > 0x7E:
            escaped.append(f"\\u{code:04x}" if code <= 0xFFFF else _surrogates(code))
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _surrogates(code):
    code -= 0x10000
    return f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}"


def _put(v, out, export, depth):
    if depth > _DEPTH:
        raise WireError(f"value nested more than {_DEPTH} deep")
    t = type(v)
    if v is None:
        out.append("null")
    elif v is True or v is False:
        out.append("true" if v else "false")
    elif t is int:
        out.append(int.__repr__(v))
    elif t is float:
        out.append(float.__repr__(v) if v - v == 0.0 else f'{{"F":"{float.__repr__(v)}"}}')
    elif t is str:
        out.append(_string(v))
    elif t is list:
        _items("[", v, "]", out, export, depth)
    elif t is tuple:
        _items('{"T":[', v, "]}", out, export, depth)
    elif t is dict:
        out.append('{"D":[')
        for i, (key, item) in enumerate(v.items()):
            out.append(",[" if i else "[")
            _put(key, out, export, depth + 1)
            out.append(",")
            _put(item, out, export, depth + 1)
            out.append("]")
        out.append("]}")
    elif t is set or t is frozenset:
        _items('{"S":[' if t is set else '{"Z":[', v, "]}", out, export, depth)
    elif t is bytes or t is bytearray:
        out.append(f'{{"{"B" if t is bytes else "A"}":"{v.hex()}"}}')
    elif t is complex:
        out.append('{"C":[')
        _put(v.real, out, export, depth + 1)
        out.append(",")
        _put(v.imag, out, export, depth + 1)
        out.append("]}")
    else:
        _put_other(v, out, export, depth)


def _items(head, values, tail, out, export, depth):
    out.append(head)
    for i, item in enumerate(values):
        if i:
            out.append(",")
        _put(item, out, export, depth + 1)
    out.append(tail)


class Handle:
    """Wraps a value that must cross as a handle even if it looks like data (too deep, a cycle)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _put_other(v, out, export, depth):
    if isinstance(v, Remote) and export is not None:
        out.append(f'{{"R":{v._id}}}')
        return
    if isinstance(v, Handle) and export is not None:
        out.append(export(v.value))
        return
    # A subclass of a built-in type crosses as its built-in value: the methods it
    # overrides (__eq__, __repr__...) stay behind.
    for base in _BASES:
        if isinstance(v, base):
            if base is int:
                plain = int.__int__(v)
            elif base is float:
                plain = float.__float__(v)
            elif base is str:
                plain = str.__str__(v)
            else:
                plain = base(v)
            _put(plain, out, export, depth)
            return
    name = getattr(v, "__name__", None)
    if isinstance(name, str) and getattr(builtins, name, None) is v:
        out.append(f'{{"N":{_string(name)}}}')
        return
    if export is None:
        raise TypeError(f"{type(v).__name__} is not plain data")
    out.append(export(v))


# ------------------------------------------------------------------ decoding


class Opaque:
    """Stands for an object that stayed in the sandbox (on the host, which holds no channel)."""

    __slots__ = ("text",)

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return f"<object of the program: {self.text}>"


def _long_int(digits):
    if len(digits) <= _SHORT_DIGITS:
        return int(digits)
    sign, body = (-1, digits[1:]) if digits[0] == "-" else (1, digits)
    value = 0
    for start in range(0, len(body), _SHORT_DIGITS):
        chunk = body[start : start + _SHORT_DIGITS]
        value = value * 10 ** len(chunk) + int(chunk)
    return sign * value


def _no_constant(name):
    raise WireError(f"{name} is not allowed on the wire")


class _Context:
    """What ``_json.make_scanner`` reads its settings from."""

    strict = True
    object_pairs_hook = None
    parse_float = float
    parse_int = staticmethod(_long_int)
    parse_constant = staticmethod(_no_constant)

    def __init__(self, object_hook):
        self.object_hook = object_hook
        self.memo = {}


def _tagged(channel):
    def hook(obj):
        if len(obj) != 1:
            raise WireError("an object on the wire carries exactly one tag")
        ((tag, v),) = obj.items()
        if tag == "T":
            return tuple(v)
        if tag == "D":
            return dict(v)
        if tag == "S":
            return set(v)
        if tag == "Z":
            return frozenset(v)
        if tag in ("B", "A"):
            return (bytes if tag == "B" else bytearray).fromhex(v)
        if tag == "C":
            return complex(*v)
        if tag == "F" and v in ("inf", "-inf", "nan"):
            return float(v)
        if tag == "N" and callable(getattr(builtins, v, None)):
            return getattr(builtins, v)
        if tag == "H":
            if channel is None:
                return Opaque(f"handle {v[0]}")
            return (RemoteCallable if v[1] else Remote)(channel, int(v[0]))
        if tag == "R" and channel is not None:
            return _own(channel, v)
        if tag == "O":
            return Opaque(str(v))
        raise WireError(f"unknown tag {tag!r}")

    return hook


def decode(text, channel=None):
    """The value in JSON ``text``; handles become :class:`Remote` objects of ``channel``."""
    try:
        if _json is None:
            import json

            hooks = {"parse_int": _long_int, "parse_constant": _no_constant}
            return json.loads(text, object_hook=_tagged(channel), **hooks)
        value, end = _json.make_scanner(_Context(_tagged(channel)))(text, 0)
    except WireError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, RecursionError, StopIteration) as exc:
        raise WireError(f"unreadable value: {type(exc).__name__}: {str(exc)[:200]}") from None
    if text[end:].strip():
        raise WireError("unreadable value: text after its end")
    return value


# ------------------------------------------------------------------ the channel


class Channel:
    """One side of the exchange: requests out, answers in, and the peer's requests served meanwhile.

    Args:
        rfd, wfd: the pipe ends to read from and write to.
        serves: the operations this side answers for the peer.
        may_export: which of this side's objects may cross as handles.
        catch: what a served request's failure is caught as and sent back.
    """

    def __init__(self, rfd, wfd, serves, may_export=None, catch=BaseException):
        self.rfd, self.wfd = rfd, wfd
        self.serves = serves
        self.may_export = may_export
        self.catch = catch
        self.exports = []
        self.gone = None  # why the peer can no longer answer
        self.budget = None  # () -> seconds left for a call, or None
        self.invoke = _invoke

    def export(self, obj):
        if self.may_export is not None and not self.may_export(obj):
            raise TypeError(f"{type(obj).__name__} cannot be passed across to the other process")
        self.exports.append(obj)
        return f'{{"H":[{len(self.exports) - 1},{int(callable(obj))}]}}'

    def send(self, message):
        data = encode(message, self.export).encode("ascii")
        view = memoryview(len(data).to_bytes(8, "little") + data)
        while view:
            view = view[os.write(self.wfd, view) :]

    def recv(self):
        size = int.from_bytes(self._read(8), "little")
        if size > MESSAGE_CAP:
            raise WireError(f"a message of {size} bytes is over the {MESSAGE_CAP}-byte cap")
        message = decode(self._read(size).decode("ascii"), self)
        if type(message) is not list or not message or type(message[0]) is not str:
            raise WireError("a message is a list that starts with its kind")
        return message

    def _read(self, n):
        chunks, left = [], n
        while left:
            chunk = os.read(self.rfd, min(left, 1 << 20))
            if not chunk:
                raise PeerGone("the other process closed the exchange")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def request(self, *message):
        """Send a request and return its answer (raising what the peer raised); serves the peer meanwhile."""
        if self.gone is not None:
            raise PeerGone(self.gone)
        try:
            self.send(list(message))
            while True:
                reply = self.recv()
                if reply[0] == "ok":
                    return reply[1]
                if reply[0] == "raise":
                    error = rebuild(reply[1], reply[2])
                    break
                self.serve(reply)
        except BaseException as exc:
            # Whatever interrupted the exchange (a timeout, a broken pipe, an
            # unreadable message) leaves it out of step: nothing more is asked.
            if self.gone is None:
                self.gone = f"{type(exc).__name__} while waiting for an answer"
            raise
        raise error

    def serve(self, message):
        """Answer one request of the peer."""
        kind, args = message[0], message[1:]
        try:
            if kind not in self.serves:
                raise PermissionError(f"{kind!r} is not served here")
            reply = ["ok", _OPERATIONS[kind](self, *args)]
        except self.catch as exc:
            reply = ["raise", [cls.__name__ for cls in type(exc).__mro__], _arguments(exc)]
        try:
            self.send(reply)
        except (TypeError, WireError) as exc:
            self.send(["raise", ["TypeError"], [f"the answer cannot be sent: {exc}"]])

    def serve_forever(self):
        """Answer requests until the peer goes away."""
        while True:
            self.serve(self.recv())


def _arguments(exc):
    try:
        args = list(exc.args)
        encode(args)
        return args
    except BaseException:
        try:
            return [str(exc)[:2000]]
        except BaseException:
            return ["<unprintable>"]


_NOT_RAISED = ("KeyboardInterrupt", "GeneratorExit", "BaseExceptionGroup", "ExceptionGroup")


def rebuild(names, args):
    """The exception the peer raised, as this side's class of the first built-in name in its MRO."""
    names = [n for n in names if type(n) is str]
    args = args if type(args) is list else [str(args)]
    if names[:1] == ["CallTimeout"]:
        return CallTimeout(*args)
    for name in names:
        cls = getattr(builtins, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException) and name not in _NOT_RAISED:
            label = names[0] if names[0] != name else None
            try:
                return cls(*args) if label is None else cls(f"{label}: {', '.join(map(str, args))}")
            except BaseException:
                return cls(", ".join(map(str, args)))
    return RuntimeError(f"{names[0] if names else 'error'}: {', '.join(map(str, args))}")


def _invoke(function, args, kwargs, budget):
    return function(*args, **kwargs)


def _own(channel, ident):
    if type(ident) is int and 0 <= ident < len(channel.exports):
        return channel.exports[ident]
    raise TypeError(f"no object {ident!r} in this process")


# Every request names its target by the index under which this side exported it.
_OPERATIONS = {
    "call": lambda ch, f, args, kwargs, budget=None: ch.invoke(_own(ch, f), args, dict(kwargs), budget),
    "attr": lambda ch, obj, name: getattr(_own(ch, obj), str(name)),
    "iter": lambda ch, obj: iter(_own(ch, obj)),
    "next": lambda ch, obj: next(_own(ch, obj)),
    "len": lambda ch, obj: len(_own(ch, obj)),
    "item": lambda ch, obj, key: _own(ch, obj)[key],
    "contains": lambda ch, obj, item: item in _own(ch, obj),
    "bool": lambda ch, obj: bool(_own(ch, obj)),
    "repr": lambda ch, obj: str(repr(_own(ch, obj))),
    "str": lambda ch, obj: str(str(_own(ch, obj))),
    "eq": lambda ch, obj, other: bool(_own(ch, obj) == other),
    "lt": lambda ch, obj, other: bool(_own(ch, obj) < other),
    "le": lambda ch, obj, other: bool(_own(ch, obj) <= other),
}
PROGRAM_OPERATIONS = frozenset(_OPERATIONS)
HARNESS_OPERATIONS = frozenset(["call"])


class Remote:
    """An object of the other process: using it asks that process; it never equals plain data."""

    __slots__ = ("_channel", "_id")

    def __init__(self, channel, ident):
        self._channel, self._id = channel, ident

    def _ask(self, kind, *args):
        return self._channel.request(kind, self._id, *args)

    def __getattr__(self, name):
        if name in ("_channel", "_id") or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        return self._ask("attr", name)

    def __iter__(self):
        return self._ask("iter")

    def __next__(self):
        return self._ask("next")

    def __len__(self):
        return self._ask("len")

    def __getitem__(self, key):
        return self._ask("item", key)

    def __contains__(self, item):
        return self._ask("contains", item)

    def __bool__(self):
        return self._ask("bool")

    def __repr__(self):
        text = self._ask("repr")
        return text if type(text) is str else "<object of the program>"

    def __str__(self):
        text = self._ask("str")
        return text if type(text) is str else "<object of the program>"

    # Two objects of the program compare as the program says; an object of the
    # program never equals a value of the tests (its __eq__ is not asked).
    def __eq__(self, other):
        return isinstance(other, Remote) and self._ask("eq", other)

    def __ne__(self, other):
        return not self.__eq__(other)

    def __lt__(self, other):
        return self._ask("lt", other) if isinstance(other, Remote) else NotImplemented

    def __le__(self, other):
        return self._ask("le", other) if isinstance(other, Remote) else NotImplemented

    def __gt__(self, other):
        return other._ask("lt", self) if isinstance(other, Remote) else NotImplemented

    def __ge__(self, other):
        return other._ask("le", self) if isinstance(other, Remote) else NotImplemented

    def __hash__(self):
        return hash((id(self._channel), self._id))


class RemoteCallable(Remote):
    """A function, class or other callable of the other process."""

    __slots__ = ()

    def __call__(self, *args, **kwargs):
        budget = self._channel.budget() if self._channel.budget else None
        return self._ask("call", list(args), [[k, v] for k, v in kwargs.items()], budget)
