def pytest_configure(config):
    config.addinivalue_line(
        "markers", "e2e: boots a real Xen under qemu (root, ~4-6 min); deselect with -m 'not e2e'")
