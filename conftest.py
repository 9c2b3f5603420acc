# pytester runs inner pytest sessions for the plugin's options and error messages.
pytest_plugins = ["pytester"]
