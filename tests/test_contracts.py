"""Every registered plugin passes the same contract checks (a new plugin gets them for free)."""
import pytest

from recmtl.registry import load_registry
from recmtl.testing import check_registered

REGISTRY = load_registry()
CASES = [(e.kind, e.name) for e in REGISTRY.rows()]


@pytest.mark.parametrize("kind,name", CASES, ids=[f"{k}:{n}" for k, n in CASES])
def test_contract(kind, name):
    check_registered(kind, name, REGISTRY.get(kind, name))


def test_every_kind_has_builtins():
    kinds = {k for k, _ in CASES}
    assert kinds == {"tower", "head", "balancer", "encoder", "interaction", "logger"}
    assert {"shared_bottom", "mmoe"} <= set(REGISTRY.names("tower"))
    assert {"binary", "esmm"} <= set(REGISTRY.names("head"))
    assert {"fixed", "uncertainty"} <= set(REGISTRY.names("balancer"))
