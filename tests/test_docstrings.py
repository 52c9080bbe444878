"""The examples in the docstrings of public classes' methods run and hold.

`--doctest-modules` skips them: the classes are re-exported with `__module__`
set to "treegraft", and doctest collects a method only from the module whose
globals it was defined in, where the class no longer counts as its own.
"""

from __future__ import annotations

import doctest
import inspect

import pytest

import treegraft as tg


def _method_examples() -> list[tuple[str, str]]:
    out = []
    for name in tg.__all__:
        cls = getattr(tg, name)
        if not inspect.isclass(cls):
            continue
        for attr, value in vars(cls).items():
            fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            if not callable(fn) or inspect.isclass(fn):
                continue  # a field default (an int's own docstring has examples)
            doc = inspect.getdoc(fn) or ""
            if ">>>" in doc:
                out.append((f"{name}.{attr}", doc))
    return out


EXAMPLES = _method_examples()


def test_methods_with_examples_are_found():
    # The two error-building methods have examples: if none is found, the
    # finder above is broken and the test below checks nothing.
    names = {name for name, _ in EXAMPLES}
    assert {"GraftError.from_problems", "GraftError.with_prefix"} <= names, names


@pytest.mark.parametrize(("name", "doc"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_method_examples_hold(name, doc):
    test = doctest.DocTestParser().get_doctest(doc, {}, name, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=lambda text: print(text, end=""))
    assert runner.failures == 0, f"{name}: {runner.failures} of {runner.tries} examples failed"
    assert runner.tries > 0
