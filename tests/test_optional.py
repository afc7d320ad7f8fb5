"""The one helper that imports optional packages: what needs the package, and the pip line that installs it."""

import pytest

from tdm.data.prompts import PromptSourceError
from tdm.errors import MissingPackage
from tdm.optional import require


def test_a_missing_package_names_what_needs_it_and_the_install_line():
    with pytest.raises(MissingPackage, match=r"^the X score needs the `no_such_pkg` package, which is not installed: "
                                             r"pip install no-such-pkg$"):
        require("no_such_pkg.sub", "the X score", install="no-such-pkg")


def test_a_package_that_fails_to_import_says_why_and_callers_choose_the_error(tmp_path, monkeypatch):
    (tmp_path / "broken_pkg.py").write_text("raise ImportError('needs libfoo.so')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PromptSourceError, match=r"which fails to import \(needs libfoo.so\): pip install broken_pkg"):
        require("broken_pkg", "prompts: reading p.parquet", error=PromptSourceError)
    assert require("json", "anything").dumps([1]) == "[1]"
