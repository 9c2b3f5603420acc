"""Functional tests that need a real host, run inside a VM:

    pytest --ost-run-inside=host-installed examples/inside             # passes
    pytest --ost-run-inside=host-installed examples/inside -m demo_fail  # shows a failure

Nothing here imports pytest-ostimages: this is a plain suite, run by the guest's
own pytest as root. The test marked ``demo_fail`` only runs when asked for.
"""


def pytest_configure(config):
    config.addinivalue_line("markers", "demo_fail: fails on purpose, to show how a failure inside the VM looks")
    if not config.option.markexpr:
        config.option.markexpr = "not demo_fail"
