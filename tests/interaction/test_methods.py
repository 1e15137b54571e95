"""Issue 21, defect 7: ``OPTIONS`` and a 405's ``Allow`` agree with the routes (the router used to name only the
first route that matched a path, so ``DELETE /v1/tasks`` said ``Allow: POST`` although ``GET`` is served too)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import LiveServer

OPENAPI = json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json").read_text())
METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


def test_options_and_405_name_every_method_the_document_lists(live: LiveServer) -> None:
    with live.client() as c:
        for template, item in OPENAPI["paths"].items():
            path = re.sub(r"\{[^}]+\}", "x", template)
            documented = {m.upper() for m in item} & METHODS
            options = c.options(path)
            assert options.status_code == 204, (path, options.text)
            allow = set(options.headers["allow"].split(", "))
            assert allow == documented | {"OPTIONS"}, (path, allow, documented)
            for method in sorted(METHODS - documented):
                refused = c.request(method, path)
                assert refused.status_code == 405, (method, path, refused.status_code)
                assert refused.headers["content-type"].startswith("application/problem+json")
                assert set(refused.headers["allow"].split(", ")) == allow, (method, path)


def test_options_on_an_unknown_path_is_a_404(live: LiveServer) -> None:
    with live.client() as c:
        assert c.options("/v1/nothing-here").status_code == 404
