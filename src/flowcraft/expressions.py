"""Safe evaluation of the small expressions carried by workflow edges.

Edge conditions (``result.output.score > 0.5 and status == 'ok'``), edge
transforms (``input.items[0]``) and loop conditions
(``context['_outputs.counter'] < 5``) come from JSON blueprints, which may be
written by people the process does not trust. This module evaluates them
without ever executing code: nothing here calls :func:`eval`, :func:`exec` or
:func:`compile`.

**Design.** An expression is parsed with :func:`ast.parse` in ``eval`` mode and
the tree is checked against a whitelist of node types; anything else (lambda,
comprehensions, f-strings, ``:=``, ``*`` unpacking, bitwise operators, calls of
anything but a fixed set of helpers, any name or attribute starting with
``__``) is refused with an :class:`~flowcraft.errors.ExpressionError` that names
the construct. The checked tree is then turned, once, into a tree of small
Python closures; evaluating the expression calls the root closure, so a simple
``a.b > 1`` costs about a microsecond. :func:`evaluate` keeps the last
:data:`CACHE_SIZE` compiled expressions in an LRU cache, since the same edge
condition is evaluated again and again. Blueprints written for the TypeScript
library may use ``&&``, ``||``, ``!``, ``===`` and ``!==``; these are rewritten to
``and``, ``or``, ``not``, ``==`` and ``!=`` before parsing (never inside string
literals), and the names ``true``, ``false``, ``null`` and ``undefined`` mean
``True``, ``False``, ``None`` and ``None`` unless the names mapping defines them.

**JSON-world semantics.** Data in a workflow is JSON-like, so lookups are
forgiving, as with optional chaining in JavaScript: an unknown name is ``None``;
``a.b`` reads the *key* ``"b"`` of the mapping ``a`` (``None`` if missing) and
never touches Python attributes, so ``input.items`` is the key ``"items"``, not
the dict method; ``xs.length`` is ``len(xs)`` for a list, tuple or string;
``a[k]`` reads a mapping key or a sequence index (``None`` if missing or out of
range); and any attribute or subscript of ``None`` (or of a number, or of any
other object) is ``None``. An ordering comparison between values that cannot be
ordered (``None > 1``, ``'a' < 1``) is ``False`` instead of an error, and so is
``x in y`` when ``y`` cannot contain ``x`` (so ``x not in y`` is then ``True``).
``is`` and ``is not`` are only accepted against ``None``, ``True`` and ``False``.
Arithmetic follows Python (``and``/``or`` return an operand, ``/`` is true
division) but only on numbers, plus ``+`` and ``*`` on strings, lists and
tuples; ``%`` is never string formatting. The callable helpers are ``len``,
``min``, ``max``, ``abs``, ``round``, ``sum``, ``any``, ``all``, ``sorted``,
``str``, ``int``, ``float``, ``bool``, ``lower``, ``upper`` and
``includes(container, item)``, called by bare name with positional arguments;
they raise on arguments of the wrong type (``len(None)`` is an error), except
that ``lower`` and ``upper`` pass ``None`` through and ``includes`` is ``False``
for anything that is not a collection.

**Limits.** A source is at most :data:`MAX_EXPRESSION_LENGTH` characters and its
tree at most :data:`MAX_DEPTH` levels deep (measured iteratively, before
anything else is done with the tree; failures of the parser itself, including
``RecursionError`` and ``MemoryError``, become ``ExpressionError``). No value
an expression builds may be larger than :data:`MAX_SEQUENCE_LENGTH`: string,
list and tuple results of ``+`` and ``*`` are checked *before* they are built
(for repetition the nested size of the repeated items counts too, so
``[[1] * 1000] * 1000`` is refused), and the list helpers refuse longer inputs.
Displays (``[a, b]``, ``(a, b)``, ``{k: v}``, ``{a, b}``) and concatenations
spend the full nested size of what they hold from the work allowance below,
counting a shared reference each time it occurs, so ``[input, input, ...]``
cannot multiply a large input into a larger result.
On top of that, one evaluation may build, slice, sort, sum or print at most
:data:`MAX_WORK` items and characters in all, so a long expression made of
many operations that each stay under the per-value limit is still cheap.
Integers beyond ``10**100`` in magnitude are refused, and ``**`` refuses
exponents beyond :data:`MAX_EXPONENT` in magnitude (unless the base is at most 1
in magnitude) as well as any power that would exceed the integer limit, so
``9**9**9`` fails at once. The grammar has no loops and every helper's input is
bounded, so evaluation time is bounded too (comparisons and ``in`` run over
values that are either the caller's data or were built under these limits).
Whatever goes wrong, the only exception that leaves this module is
``ExpressionError``; its message quotes the expression, and the caller adds
where the expression came from.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, Final, NoReturn

from flowcraft.errors import ExpressionError

__all__ = [
    "CACHE_SIZE",
    "HELPERS",
    "MAX_DEPTH",
    "MAX_EXPONENT",
    "MAX_EXPRESSION_LENGTH",
    "MAX_INT_MAGNITUDE",
    "MAX_SEQUENCE_LENGTH",
    "MAX_WORK",
    "CompiledExpression",
    "compile_expression",
    "evaluate",
]

MAX_EXPRESSION_LENGTH: Final = 2_000
"""Longest accepted expression source, in characters."""

MAX_DEPTH: Final = 50
"""Deepest accepted nesting of sub-expressions in the parsed tree."""

MAX_SEQUENCE_LENGTH: Final = 100_000
"""Largest string, list or tuple an expression may build, and largest helper input."""

MAX_INT_MAGNITUDE: Final = 10**100
"""Integer results (and literals) beyond this magnitude are refused."""

MAX_EXPONENT: Final = 64
"""Largest accepted ``**`` exponent magnitude when the base's magnitude is above 1."""

MAX_WORK: Final = 1_000_000
"""Total size of the values one evaluation may build or feed to helpers."""

CACHE_SIZE: Final = 1024
"""How many compiled expressions :func:`evaluate` keeps."""

_MAX_NUMBER_TEXT: Final = 1_000
"""Longest string ``int()`` and ``float()`` will convert."""

_MAX_ROUND_DIGITS: Final = 100

_LITERAL_NAMES: Final[Mapping[str, Any]] = {
    "true": True,
    "false": False,
    "null": None,
    "undefined": None,
}

_Budget = list[int]
"""What is left of one evaluation's work allowance (see :data:`MAX_WORK`), in a 1-item list."""

_Evaluator = Callable[[Mapping[str, Any], _Budget], Any]


class _EvalFailure(Exception):
    """Raised inside evaluation; :meth:`CompiledExpression.evaluate` adds the expression."""


# -- public API --------------------------------------------------------------------------------


class CompiledExpression:
    """A parsed and validated expression, ready to be evaluated any number of times."""

    __slots__ = ("_function", "source")

    source: str
    _function: _Evaluator

    def __init__(self, source: str, function: _Evaluator) -> None:
        self.source = source
        self._function = function

    def evaluate(self, names: Mapping[str, Any]) -> Any:
        """Evaluate against ``names``; raises :class:`ExpressionError` and nothing else."""
        try:
            return self._function(names, [MAX_WORK])
        except _EvalFailure as exc:
            raise ExpressionError(
                f"cannot evaluate expression {_quote(self.source)}: {_shorten(str(exc))}",
                expression=self.source,
            ) from None
        except ZeroDivisionError:
            raise ExpressionError(
                f"division by zero in expression {_quote(self.source)}",
                expression=self.source,
            ) from None
        except ExpressionError:
            raise
        except Exception as exc:
            if not isinstance(names, Mapping):
                detail = f"names must be a mapping, not {type(names).__name__}"
            elif isinstance(exc, RecursionError | MemoryError):
                detail = "the values involved are too large or too deeply nested"
            else:
                detail = _shorten(str(exc)) or type(exc).__name__
            raise ExpressionError(
                f"cannot evaluate expression {_quote(self.source)}: {detail}",
                expression=self.source,
            ) from exc

    def __repr__(self) -> str:
        return f"CompiledExpression({self.source!r})"


def compile_expression(expression: str) -> CompiledExpression:
    """Parse and validate ``expression`` once; raises :class:`ExpressionError` if refused."""
    if not isinstance(expression, str):
        raise ExpressionError(
            f"an expression must be a string, not {type(expression).__name__}",
            expression=None,
        )
    return _compile_cached(expression)


def evaluate(expression: str, names: Mapping[str, Any]) -> Any:
    """Evaluate ``expression`` against ``names`` (compiled expressions are cached)."""
    return compile_expression(expression).evaluate(names)


# -- compilation -------------------------------------------------------------------------------


@lru_cache(maxsize=CACHE_SIZE)
def _compile_cached(source: str) -> CompiledExpression:
    return CompiledExpression(source, _compile(source))


def _compile(source: str) -> _Evaluator:
    if len(source) > MAX_EXPRESSION_LENGTH:
        raise ExpressionError(
            f"expression {_quote(source)} is too long: {len(source)} characters, "
            f"the limit is {MAX_EXPRESSION_LENGTH}",
            expression=source,
        )
    text = _translate_js_operators(source).strip()
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(
            f"cannot parse expression {_quote(source)}: {exc.msg}", expression=source
        ) from None
    except (RecursionError, MemoryError):
        raise ExpressionError(
            f"cannot parse expression {_quote(source)}: it is nested too deeply",
            expression=source,
        ) from None
    except Exception as exc:  # e.g. ValueError for a NUL character
        raise ExpressionError(
            f"cannot parse expression {_quote(source)}: {_shorten(str(exc))}",
            expression=source,
        ) from None
    _check_depth(tree, source)
    try:
        return _Compiler(source).compile(tree.body)
    except ExpressionError:
        raise
    except Exception as exc:  # nothing but ExpressionError may leave this module
        raise ExpressionError(
            f"cannot compile expression {_quote(source)}: {_shorten(str(exc))}",
            expression=source,
        ) from exc


def _translate_js_operators(source: str) -> str:
    """Rewrite ``&& || ! === !==`` to Python, outside string literals.

    Line breaks outside strings become spaces (so a condition may span lines in
    a blueprint) and ``#`` comments are dropped.
    """
    if not any(c in source for c in "!&|#\r\n") and "===" not in source:
        return source
    out: list[str] = []
    i = 0
    n = len(source)
    while i < n:
        char = source[i]
        if char in "'\"":
            end = _string_literal_end(source, i)
            out.append(source[i:end])
            i = end
        elif char == "#":
            newline = source.find("\n", i)
            i = n if newline < 0 else newline
        elif char in "\r\n":
            out.append(" ")
            i += 1
        elif source.startswith("===", i):
            out.append("==")
            i += 3
        elif source.startswith("!==", i):
            out.append("!=")
            i += 3
        elif source.startswith("!=", i):
            out.append("!=")
            i += 2
        elif char == "!":
            out.append(" not ")
            i += 1
        elif source.startswith("&&", i):
            out.append(" and ")
            i += 2
        elif source.startswith("||", i):
            out.append(" or ")
            i += 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


def _string_literal_end(source: str, start: int) -> int:
    """Index just past the string literal opening at ``start`` (the end if unterminated)."""
    quote = source[start]
    delimiter = quote * 3 if source.startswith(quote * 3, start) else quote
    i = start + len(delimiter)
    n = len(source)
    while i < n:
        char = source[i]
        if char == "\\":
            i += 2
        elif source.startswith(delimiter, i):
            return i + len(delimiter)
        else:
            i += 1
    return n


_LEAF_KINDS: Final = (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)


def _check_depth(tree: ast.AST, source: str) -> None:
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ExpressionError(
                f"expression {_quote(source)} is nested too deeply (more than {MAX_DEPTH} levels)",
                expression=source,
            )
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, _LEAF_KINDS):
                stack.append((child, depth + 1))


_REFUSED_CONSTRUCTS: Final[Mapping[type[ast.AST], str]] = {
    ast.Lambda: "lambda",
    ast.ListComp: "list comprehension",
    ast.SetComp: "set comprehension",
    ast.DictComp: "dict comprehension",
    ast.GeneratorExp: "generator expression",
    ast.JoinedStr: "f-string",
    ast.FormattedValue: "f-string",
    ast.NamedExpr: "assignment expression (:=)",
    ast.Starred: "unpacking with *",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield from",
    ast.Slice: "slice inside a tuple (a[x:y, z])",
}

_REFUSED_OPERATORS: Final[Mapping[type[ast.AST], str]] = {
    ast.BitAnd: "operator & (use 'and')",
    ast.BitOr: "operator | (use 'or')",
    ast.BitXor: "operator ^",
    ast.LShift: "operator <<",
    ast.RShift: "operator >>",
    ast.MatMult: "operator @",
    ast.Invert: "operator ~",
}


def _is_singleton(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return node.value is None or node.value is True or node.value is False
    return isinstance(node, ast.Name) and node.id in _LITERAL_NAMES


class _Compiler:
    """Validates a tree node by node and turns it into closures."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._handlers: dict[type[ast.AST], Callable[[Any], _Evaluator]] = {
            ast.Constant: self._constant,
            ast.Name: self._name,
            ast.Attribute: self._attribute,
            ast.Subscript: self._subscript,
            ast.List: self._list,
            ast.Tuple: self._tuple,
            ast.Set: self._set,
            ast.Dict: self._dict,
            ast.BoolOp: self._bool_op,
            ast.UnaryOp: self._unary_op,
            ast.BinOp: self._bin_op,
            ast.Compare: self._compare,
            ast.IfExp: self._if_exp,
            ast.Call: self._call,
        }

    def refuse(self, detail: str) -> NoReturn:
        raise ExpressionError(
            f"invalid expression {_quote(self.source)}: {detail}", expression=self.source
        )

    def compile(self, node: ast.AST) -> _Evaluator:
        handler = self._handlers.get(type(node))
        if handler is None:
            construct = _REFUSED_CONSTRUCTS.get(type(node), type(node).__name__)
            self.refuse(f"{construct} is not allowed in expressions")
        return handler(node)

    def _check_identifier(self, identifier: str, kind: str) -> None:
        if identifier.startswith("__"):
            self.refuse(
                f"{kind} {identifier!r} is not allowed: names starting with '__' are refused"
            )

    # leaves

    def _constant(self, node: ast.Constant) -> _Evaluator:
        value = node.value
        if isinstance(value, int) and not isinstance(value, bool):
            if not -MAX_INT_MAGNITUDE <= value <= MAX_INT_MAGNITUDE:
                self.refuse("integer literal is too large (the limit is 10**100)")
        elif not (value is None or isinstance(value, bool | str | float)):
            self.refuse(f"{type(value).__name__} literals are not allowed in expressions")

        def constant(names: Mapping[str, Any], budget: _Budget) -> Any:
            return value

        return constant

    def _name(self, node: ast.Name) -> _Evaluator:
        identifier = node.id
        self._check_identifier(identifier, "name")
        if identifier in _LITERAL_NAMES:
            default = _LITERAL_NAMES[identifier]

            def literal_name(names: Mapping[str, Any], budget: _Budget) -> Any:
                return names.get(identifier, default)

            return literal_name

        def name(names: Mapping[str, Any], budget: _Budget) -> Any:
            return names.get(identifier)

        return name

    # lookups

    def _attribute(self, node: ast.Attribute) -> _Evaluator:
        key = node.attr
        self._check_identifier(key, "attribute")
        target = self.compile(node.value)

        def attribute(names: Mapping[str, Any], budget: _Budget) -> Any:
            obj = target(names, budget)
            if type(obj) is dict or isinstance(obj, Mapping):
                return obj.get(key)
            if key == "length" and isinstance(obj, list | tuple | str):
                return len(obj)
            return None

        return attribute

    def _subscript(self, node: ast.Subscript) -> _Evaluator:
        target = self.compile(node.value)
        if isinstance(node.slice, ast.Slice):
            lower = self._optional(node.slice.lower)
            upper = self._optional(node.slice.upper)
            step = self._optional(node.slice.step)

            def slice_(names: Mapping[str, Any], budget: _Budget) -> Any:
                obj = target(names, budget)
                bounds = slice(
                    _slice_bound(lower(names, budget)),
                    _slice_bound(upper(names, budget)),
                    _slice_bound(step(names, budget)),
                )
                if bounds.step == 0:
                    raise _EvalFailure("slice step cannot be zero")
                if isinstance(obj, list | tuple | str):
                    part = obj[bounds]
                    _spend(budget, len(part))
                    return part
                return None

            return slice_

        key = self.compile(node.slice)

        def subscript(names: Mapping[str, Any], budget: _Budget) -> Any:
            return _lookup(target(names, budget), key(names, budget))

        return subscript

    def _optional(self, node: ast.expr | None) -> _Evaluator:
        if node is None:
            return _none
        return self.compile(node)

    # displays

    def _elements(self, nodes: list[ast.expr]) -> list[_Evaluator]:
        return [self.compile(n) for n in nodes]

    def _list(self, node: ast.List) -> _Evaluator:
        elements = self._elements(node.elts)

        def list_(names: Mapping[str, Any], budget: _Budget) -> Any:
            return _charge(budget, [e(names, budget) for e in elements])

        return list_

    def _tuple(self, node: ast.Tuple) -> _Evaluator:
        elements = self._elements(node.elts)

        def tuple_(names: Mapping[str, Any], budget: _Budget) -> Any:
            return _charge(budget, tuple([e(names, budget) for e in elements]))

        return tuple_

    def _set(self, node: ast.Set) -> _Evaluator:
        elements = self._elements(node.elts)

        def set_(names: Mapping[str, Any], budget: _Budget) -> Any:
            return _charge(budget, {e(names, budget) for e in elements})

        return set_

    def _dict(self, node: ast.Dict) -> _Evaluator:
        if any(k is None for k in node.keys):
            self.refuse("dict unpacking (**) is not allowed in expressions")
        items = [
            (self.compile(k), self.compile(v))
            for k, v in zip(node.keys, node.values, strict=True)
            if k is not None
        ]

        def dict_(names: Mapping[str, Any], budget: _Budget) -> Any:
            return _charge(budget, {k(names, budget): v(names, budget) for k, v in items})

        return dict_

    # operators

    def _bool_op(self, node: ast.BoolOp) -> _Evaluator:
        operands = self._elements(node.values)
        if isinstance(node.op, ast.And):

            def and_(names: Mapping[str, Any], budget: _Budget) -> Any:
                value = None
                for operand in operands:
                    value = operand(names, budget)
                    if not value:
                        return value
                return value

            return and_

        def or_(names: Mapping[str, Any], budget: _Budget) -> Any:
            value = None
            for operand in operands:
                value = operand(names, budget)
                if value:
                    return value
            return value

        return or_

    def _unary_op(self, node: ast.UnaryOp) -> _Evaluator:
        operand = self.compile(node.operand)
        if isinstance(node.op, ast.Not):

            def not_(names: Mapping[str, Any], budget: _Budget) -> Any:
                return not operand(names, budget)

            return not_
        if isinstance(node.op, ast.USub):

            def negative(names: Mapping[str, Any], budget: _Budget) -> Any:
                return _check_int(-_number(operand(names, budget), "unary -"))

            return negative
        if isinstance(node.op, ast.UAdd):

            def positive(names: Mapping[str, Any], budget: _Budget) -> Any:
                return +_number(operand(names, budget), "unary +")

            return positive
        self.refuse(f"{_REFUSED_OPERATORS.get(type(node.op), 'operator')} is not allowed")

    def _bin_op(self, node: ast.BinOp) -> _Evaluator:
        function = _ARITHMETIC.get(type(node.op))
        if function is None:
            described = _REFUSED_OPERATORS.get(type(node.op), type(node.op).__name__)
            self.refuse(f"{described} is not allowed in expressions")
        left = self.compile(node.left)
        right = self.compile(node.right)

        def bin_op(names: Mapping[str, Any], budget: _Budget) -> Any:
            return function(budget, left(names, budget), right(names, budget))

        return bin_op

    def _compare(self, node: ast.Compare) -> _Evaluator:
        nodes = [node.left, *node.comparators]
        for op, a, b in zip(node.ops, nodes, nodes[1:], strict=False):
            if isinstance(op, ast.Is | ast.IsNot) and not (_is_singleton(a) or _is_singleton(b)):
                self.refuse("'is' and 'is not' may only compare with None, True or False")
        comparisons = [_COMPARISONS[type(op)] for op in node.ops]
        operands = self._elements(nodes)
        if len(comparisons) == 1:
            compare_one = comparisons[0]
            left, right = operands

            def compare(names: Mapping[str, Any], budget: _Budget) -> Any:
                return compare_one(left(names, budget), right(names, budget))

            return compare

        first, rest = operands[0], list(zip(comparisons, operands[1:], strict=True))

        def chained(names: Mapping[str, Any], budget: _Budget) -> Any:
            a = first(names, budget)
            result: Any = True
            for compare_step, operand in rest:
                b = operand(names, budget)
                result = compare_step(a, b)
                if not result:
                    return result
                a = b
            return result

        return chained

    def _if_exp(self, node: ast.IfExp) -> _Evaluator:
        test = self.compile(node.test)
        body = self.compile(node.body)
        orelse = self.compile(node.orelse)

        def if_exp(names: Mapping[str, Any], budget: _Budget) -> Any:
            return body(names, budget) if test(names, budget) else orelse(names, budget)

        return if_exp

    # calls

    def _call(self, node: ast.Call) -> _Evaluator:
        func = node.func
        if isinstance(func, ast.Attribute):
            self.refuse(
                "calling a method (such as x.upper()) is not allowed in expressions; "
                "helpers are called by name, e.g. upper(x)"
            )
        if not isinstance(func, ast.Name):
            self.refuse(f"only the helpers {_HELPER_LIST} may be called")
        self._check_identifier(func.id, "name")
        helper = HELPERS.get(func.id)
        if helper is None:
            self.refuse(f"{func.id}() is not an allowed function; the helpers are {_HELPER_LIST}")
        function, min_args, max_args = helper
        if node.keywords:
            self.refuse(f"{func.id}() takes no keyword arguments in expressions")
        count = len(node.args)
        if not min_args <= count <= max_args:
            if min_args == max_args:
                expected = str(min_args)
            elif max_args == _MANY:
                expected = f"at least {min_args}"
            else:
                expected = f"{min_args} to {max_args}"
            self.refuse(f"{func.id}() takes {expected} argument(s), got {count}")
        arguments = self._elements(node.args)
        if count == 1:
            (only,) = arguments

            def call_one(names: Mapping[str, Any], budget: _Budget) -> Any:
                return function(budget, only(names, budget))

            return call_one

        def call(names: Mapping[str, Any], budget: _Budget) -> Any:
            return function(budget, *[a(names, budget) for a in arguments])

        return call


def _none(names: Mapping[str, Any], budget: _Budget) -> None:
    return None


# -- value semantics ---------------------------------------------------------------------------


def _lookup(obj: Any, key: Any) -> Any:
    if type(obj) is dict or isinstance(obj, Mapping):
        try:
            return obj.get(key)
        except TypeError:  # unhashable key: it cannot be there
            return None
    if (
        isinstance(obj, list | tuple | str)
        and isinstance(key, int)
        and not isinstance(key, bool)
        and -len(obj) <= key < len(obj)
    ):
        return obj[key]
    return None


def _slice_bound(value: Any) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise _EvalFailure(f"slice bounds must be integers, not {_type_name(value)}")


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float)


def _number(value: Any, what: str) -> int | float:
    if isinstance(value, int | float):
        return value
    raise _EvalFailure(f"{what} needs a number, not {_type_name(value)}")


def _check_int(value: Any) -> Any:
    if isinstance(value, int) and not -MAX_INT_MAGNITUDE <= value <= MAX_INT_MAGNITUDE:
        raise _EvalFailure("integer result is too large (the limit is 10**100 in magnitude)")
    return value


def _check_real(value: Any) -> Any:
    if isinstance(value, complex):
        raise _EvalFailure("the result is not a real number")
    return value


def _operand_error(symbol: str, a: Any, b: Any) -> _EvalFailure:
    return _EvalFailure(f"cannot apply {symbol} to {_type_name(a)} and {_type_name(b)}")


def _spend(budget: _Budget, amount: int) -> None:
    budget[0] -= amount
    if budget[0] < 0:
        raise _EvalFailure(
            f"the expression handles too much data (more than {MAX_WORK} items and "
            "characters in one evaluation)"
        )


_SCALAR_TYPES: Final = frozenset({int, float, bool, type(None)})


def _size(value: Any, limit: int) -> int:
    """How big ``value`` is: one per object, plus one per character of each string.

    Shared references count each time they occur, since that is what repetition
    amplifies. Counting stops as soon as the total exceeds ``limit``. Flat lists
    of scalars or of strings are measured without a Python-level loop.
    """
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += 1 + len(item)
        elif type(item) in _SCALAR_TYPES:
            total += 1
        elif isinstance(item, list | tuple | set | frozenset):
            total += 1
            if total + len(item) > limit:
                return limit + 1
            kinds = set(map(type, item))
            if kinds <= _SCALAR_TYPES:
                total += len(item)
            elif kinds == {str}:
                total += len(item) + sum(map(len, item))
            else:
                stack.extend(item)
        elif isinstance(item, Mapping):
            total += 1
            if total + 2 * len(item) > limit:
                return limit + 1
            stack.append(tuple(item.keys()))
            stack.append(tuple(item.values()))
        else:
            total += 1
        if total > limit:
            return total
    return total


def _charge(budget: _Budget, built: Any) -> Any:
    """Spend the full size of a value just built from references (a display, a
    concatenation): whatever later stores, compares or prints it walks every item, so
    ``[input, input, input]`` costs three times ``input``."""
    _spend(budget, _size(built, max(budget[0], 0)))
    return built


def _too_long(symbol: str, kind: str, length: int) -> _EvalFailure:
    unit = "characters" if kind == "str" else "items"
    return _EvalFailure(
        f"{symbol} would build a {kind} of {length} {unit}; the limit is {MAX_SEQUENCE_LENGTH}"
    )


def _repeat(budget: _Budget, sequence: Any, count: int) -> Any:
    if count <= 0 or not sequence:
        return sequence[:0]
    length = len(sequence) * count
    if length > MAX_SEQUENCE_LENGTH:
        raise _too_long("*", type(sequence).__name__, length)
    _spend(budget, length)
    if count > 1 and not isinstance(sequence, str):
        # The items are shared, not copied, but whatever later compares, hashes or
        # prints the result walks every occurrence: their total size counts.
        limit = MAX_SEQUENCE_LENGTH // count
        contents = _size(sequence, limit + 1) - 1
        _spend(budget, min(contents, limit + 1))
        if contents > limit:
            raise _EvalFailure(
                f"* would build a {type(sequence).__name__} whose nested contents exceed "
                f"{MAX_SEQUENCE_LENGTH} items and characters"
            )
    return sequence * count


def _add(budget: _Budget, a: Any, b: Any) -> Any:
    if _is_number(a) and _is_number(b):
        return _check_int(a + b)
    if (
        (isinstance(a, str) and isinstance(b, str))
        or (isinstance(a, list) and isinstance(b, list))
        or (isinstance(a, tuple) and isinstance(b, tuple))
    ):
        return _concatenate(budget, a, b)
    raise _operand_error("+", a, b)


def _concatenate(budget: _Budget, a: Any, b: Any) -> Any:
    length = len(a) + len(b)
    if length > MAX_SEQUENCE_LENGTH:
        raise _too_long("+", type(a).__name__, length)
    if isinstance(a, str):
        _spend(budget, length)
        return a + b
    # The items are shared, not copied: their nested size counts, as for displays.
    _charge(budget, a)
    _charge(budget, b)
    return a + b


def _subtract(budget: _Budget, a: Any, b: Any) -> Any:
    if _is_number(a) and _is_number(b):
        return _check_int(a - b)
    raise _operand_error("-", a, b)


def _multiply(budget: _Budget, a: Any, b: Any) -> Any:
    if _is_number(a) and _is_number(b):
        return _check_int(a * b)
    if isinstance(a, str | list | tuple) and isinstance(b, int):
        return _repeat(budget, a, b)
    if isinstance(b, str | list | tuple) and isinstance(a, int):
        return _repeat(budget, b, a)
    raise _operand_error("*", a, b)


def _true_divide(budget: _Budget, a: Any, b: Any) -> Any:
    if _is_number(a) and _is_number(b):
        return a / b
    raise _operand_error("/", a, b)


def _floor_divide(budget: _Budget, a: Any, b: Any) -> Any:
    if _is_number(a) and _is_number(b):
        return _check_int(a // b)
    raise _operand_error("//", a, b)


def _modulo(budget: _Budget, a: Any, b: Any) -> Any:
    if _is_number(a) and _is_number(b):
        return _check_int(a % b)
    raise _operand_error("%", a, b)


def _power(budget: _Budget, base: Any, exponent: Any) -> Any:
    if not (_is_number(base) and _is_number(exponent)):
        raise _operand_error("**", base, exponent)
    if abs(base) <= 1:
        if isinstance(exponent, int) and isinstance(base, int):
            # 0, 1 or -1 to an integer power: nothing big is ever computed.
            if base == 0 and exponent < 0:
                raise ZeroDivisionError
            if base == 0:
                return 1 if exponent == 0 else 0
            return base if exponent % 2 else 1
        return _check_real(base**exponent)
    if abs(exponent) > MAX_EXPONENT:
        raise _EvalFailure(
            f"exponent {_shorten(repr(exponent))} is too large for ** (the limit is "
            f"{MAX_EXPONENT} when the base is larger than 1 in magnitude)"
        )
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        # |base| >= 2**(bits - 1), so the result has at least (bits - 1) * exponent bits.
        if (abs(base).bit_length() - 1) * exponent > MAX_INT_MAGNITUDE.bit_length():
            raise _EvalFailure("integer result is too large (the limit is 10**100 in magnitude)")
        return _check_int(base**exponent)
    return _check_real(base**exponent)


_ARITHMETIC: Final[Mapping[type[ast.AST], Callable[[_Budget, Any, Any], Any]]] = {
    ast.Add: _add,
    ast.Sub: _subtract,
    ast.Mult: _multiply,
    ast.Div: _true_divide,
    ast.FloorDiv: _floor_divide,
    ast.Mod: _modulo,
    ast.Pow: _power,
}


def _forgiving(compare: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def forgiving(a: Any, b: Any) -> Any:
        try:
            return compare(a, b)
        except TypeError:
            return False

    return forgiving


def _contains(item: Any, container: Any) -> bool:
    try:
        return item in container
    except TypeError:
        return False


def _not_contains(item: Any, container: Any) -> bool:
    return not _contains(item, container)


_COMPARISONS: Final[Mapping[type[ast.AST], Callable[[Any, Any], Any]]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: _forgiving(operator.lt),
    ast.LtE: _forgiving(operator.le),
    ast.Gt: _forgiving(operator.gt),
    ast.GtE: _forgiving(operator.ge),
    ast.In: _contains,
    ast.NotIn: _not_contains,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}


# -- helpers -----------------------------------------------------------------------------------


_COLLECTIONS: Final = (list, tuple, str, set, frozenset, Mapping)


def _collection(budget: _Budget, value: Any, helper: str) -> Any:
    if isinstance(value, _COLLECTIONS):
        if len(value) > MAX_SEQUENCE_LENGTH:
            raise _EvalFailure(
                f"{helper}() accepts at most {MAX_SEQUENCE_LENGTH} items, got {len(value)}"
            )
        _spend(budget, len(value))
        return value
    raise _EvalFailure(f"{helper}() needs a list, string or mapping, not {_type_name(value)}")


def _helper_len(budget: _Budget, value: Any) -> int:
    if isinstance(value, _COLLECTIONS):
        return len(value)
    raise _EvalFailure(f"len() needs a list, string or mapping, not {_type_name(value)}")


def _extreme(budget: _Budget, name: str, choose: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    values = _collection(budget, args[0], name) if len(args) == 1 else args
    if not values:
        raise _EvalFailure(f"{name}() of an empty collection")
    return choose(values)


def _helper_min(budget: _Budget, *args: Any) -> Any:
    return _extreme(budget, "min", min, args)


def _helper_max(budget: _Budget, *args: Any) -> Any:
    return _extreme(budget, "max", max, args)


def _helper_abs(budget: _Budget, value: Any) -> Any:
    return _check_int(abs(_number(value, "abs()")))


def _helper_round(budget: _Budget, value: Any, digits: Any = None) -> Any:
    number = _number(value, "round()")
    if digits is None:
        return _check_int(round(number))
    if not isinstance(digits, int) or isinstance(digits, bool):
        raise _EvalFailure(f"round() needs an integer number of digits, not {_type_name(digits)}")
    if abs(digits) > _MAX_ROUND_DIGITS:
        raise _EvalFailure(f"round() accepts at most {_MAX_ROUND_DIGITS} digits")
    return _check_int(round(number, digits))


def _helper_sum(budget: _Budget, values: Any, start: Any = 0) -> Any:
    items = _collection(budget, values, "sum")
    total = _number(start, "sum() start")
    if not set(map(type, items)) <= _SCALAR_TYPES - {type(None)}:
        for item in items:
            _number(item, "sum()")
    return _check_int(sum(items, total))


def _helper_any(budget: _Budget, values: Any) -> bool:
    return any(_collection(budget, values, "any"))


def _helper_all(budget: _Budget, values: Any) -> bool:
    return all(_collection(budget, values, "all"))


def _helper_sorted(budget: _Budget, values: Any) -> list[Any]:
    return sorted(_collection(budget, values, "sorted"))


def _helper_str(budget: _Budget, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple | set | frozenset | Mapping):
        size = _size(value, MAX_SEQUENCE_LENGTH)
        _spend(budget, size)
        if size > MAX_SEQUENCE_LENGTH:
            raise _EvalFailure(
                f"str() of a value larger than {MAX_SEQUENCE_LENGTH} items and characters"
            )
    text = str(value)
    if len(text) > MAX_SEQUENCE_LENGTH:
        raise _too_long("str()", "str", len(text))
    _spend(budget, len(text))
    return text


def _number_text(value: str, helper: str) -> str:
    if len(value) > _MAX_NUMBER_TEXT:
        raise _EvalFailure(f"{helper}() of a string longer than {_MAX_NUMBER_TEXT} characters")
    return value


def _helper_int(budget: _Budget, value: Any) -> int:
    if isinstance(value, int | float):
        return int(_check_int(int(value)))
    if isinstance(value, str):
        return int(_check_int(int(_number_text(value, "int"))))
    raise _EvalFailure(f"int() needs a number or a string, not {_type_name(value)}")


def _helper_float(budget: _Budget, value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return float(_number_text(value, "float"))
    raise _EvalFailure(f"float() needs a number or a string, not {_type_name(value)}")


def _helper_bool(budget: _Budget, value: Any) -> bool:
    return bool(value)


def _change_case(
    budget: _Budget, value: Any, helper: str, change: Callable[[str], str]
) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _EvalFailure(f"{helper}() needs a string, not {_type_name(value)}")
    _spend(budget, len(value))
    text = change(value)
    if len(text) > MAX_SEQUENCE_LENGTH:
        raise _too_long(f"{helper}()", "str", len(text))
    return text


def _helper_lower(budget: _Budget, value: Any) -> str | None:
    return _change_case(budget, value, "lower", str.lower)


def _helper_upper(budget: _Budget, value: Any) -> str | None:
    return _change_case(budget, value, "upper", str.upper)


def _helper_includes(budget: _Budget, container: Any, item: Any) -> bool:
    if isinstance(container, str):
        return isinstance(item, str) and item in container
    if isinstance(container, list | tuple | set | frozenset | Mapping):
        return _contains(item, container)
    return False


_MANY: Final = 1_000_000

HELPERS: Final[Mapping[str, tuple[Callable[..., Any], int, int]]] = {
    "len": (_helper_len, 1, 1),
    "min": (_helper_min, 1, _MANY),
    "max": (_helper_max, 1, _MANY),
    "abs": (_helper_abs, 1, 1),
    "round": (_helper_round, 1, 2),
    "sum": (_helper_sum, 1, 2),
    "any": (_helper_any, 1, 1),
    "all": (_helper_all, 1, 1),
    "sorted": (_helper_sorted, 1, 1),
    "str": (_helper_str, 1, 1),
    "int": (_helper_int, 1, 1),
    "float": (_helper_float, 1, 1),
    "bool": (_helper_bool, 1, 1),
    "lower": (_helper_lower, 1, 1),
    "upper": (_helper_upper, 1, 1),
    "includes": (_helper_includes, 2, 2),
}
"""The functions an expression may call: name -> (function, fewest and most arguments).

Each function takes the evaluation's work budget first, then the call's arguments.
"""

_HELPER_LIST: Final = ", ".join(HELPERS)


# -- messages ----------------------------------------------------------------------------------


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote(source: str) -> str:
    return repr(_shorten(source, 120))
