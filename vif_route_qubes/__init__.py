"""vif-route-qubes: routed, spoof-proof networking for Xen guests from a netvm.

Kept empty of imports on purpose: every hotplug run imports this package
first, and start-up time is a feature (see benchmarks/README.md).
"""

__version__ = "0.1.0"
