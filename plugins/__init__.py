"""pplex's built-in plugins, one module each, installed as the `pplex_plugins` package.

They are registered exactly like third-party plugins: through the
`pplex.plugins` entry point group in setup.py, by short name.
"""
