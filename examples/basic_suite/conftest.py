"""An OST basic-suite in miniature, against the project's own test images.

The plugin's default fixtures are enough: ``engine`` (engine-installed layer),
``hosts`` / ``host0`` / ``host1`` (host-installed layer), all on one management
network and booted together. A suite that needs other layers declares its own:

    from pytest_ostimages import vm_fixture
    storage = vm_fixture("storage", "storage-installed")
"""
