"""The firewall backends keep one declared contract (issue 17 §5): both
registered backends are VifGuard and DnsRules types, with every method of
the contract; a backend missing one cannot even be made."""

import inspect

import pytest

from vif_route_qubes.firewall import backend_for, contract
from vif_route_qubes.system import System


@pytest.mark.parametrize("name", sorted(contract.REGISTRY))
def test_every_registered_backend_keeps_the_contract(name):
    guard = contract.guard_class(name)
    assert issubclass(guard, contract.VifGuard) and not inspect.isabstract(guard)
    assert guard.name == name
    rules = contract.dns_rules(name)
    assert isinstance(rules, contract.DnsRules) and rules.name == name and rules.owned
    fw = backend_for(System(env={}), {"VIF_ROUTE_QUBES_FIREWALL": name})
    assert isinstance(fw, guard)


def test_a_backend_missing_a_duty_cannot_be_made():
    class Half(contract.VifGuard):
        def apply(self, vif, previous):
            pass

    with pytest.raises(TypeError, match="abstract"):
        Half()

    class HalfDns(contract.DnsRules):
        def listing(self, s):
            pass

    with pytest.raises(TypeError, match="abstract"):
        HalfDns()


def test_a_dns_renderer_module_missing_a_part_is_refused():
    import types

    half = types.ModuleType("half_dns")
    half.NAME, half.OWNED = "half", "nothing"
    with pytest.raises(TypeError, match="no Listing, changes, in_force"):
        contract._ModuleRules(half)
