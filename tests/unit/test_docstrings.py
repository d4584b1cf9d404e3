"""Every public name documents itself with an example, and the examples run."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

import resilient_tasks

MODULES = [
    importlib.import_module(info.name)
    for info in pkgutil.walk_packages(resilient_tasks.__path__, "resilient_tasks.")
]


@pytest.mark.parametrize("module", [resilient_tasks, *MODULES], ids=lambda m: m.__name__)
def test_docstring_examples_run(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)

    assert result.failed == 0


@pytest.mark.parametrize("name", resilient_tasks.__all__)
def test_public_name_has_a_docstring_with_an_example(name: str) -> None:
    doc = getattr(resilient_tasks, name).__doc__ or ""

    assert "Example" in doc
