"""Packaging for pplex: the `pplex` package, the built-in plugins, the `pplex` command.

The built-in plugins live in plugins/ and install as the `pplex_plugins`
package; they are registered through the same `pplex.plugins` entry point
group as any third-party plugin.
"""
from setuptools import setup

BUILTIN_PLUGINS = ["framing_raw", "route_any", "rr", "broadcast_activity",
                   "framing_len", "framing_line", "auth_allow", "auth_token",
                   "route_sticky", "route_prefix", "least_pending", "hash", "access_log"]

setup(
    name="pplex",
    version="0.1.0",
    description="TCP-to-gRPC demultiplexing proxy",
    python_requires=">=3.11",
    packages=["pplex", "pplex._proto", "pplex_plugins"],
    package_dir={"pplex_plugins": "plugins"},
    install_requires=[
        "grpcio>=1.85.1",          # the gRPC bridge and the worker SDK
        "protobuf>=7.35.1,<8",     # what the committed generated code needs
        "pluggy>=1.5",             # the plugin hooks
        "bottle>=0.13",            # admin API routes
        "waitress>=3.0",           # admin API server
        "voluptuous>=0.14",        # config and request validation
        "prometheus_client>=0.20",  # GET /metrics
        "h2>=4.1,<5",              # the h2 transport (--transport h2): HTTP/2 in the reactor thread
    ],
    extras_require={
        # cryptography: the tests make their own CAs and certificates (tests/tlsutil.py)
        "test": ["pytest>=8", "pytest-timeout>=2.3", "grpcio-tools==1.85.1", "cryptography>=42"],
    },
    entry_points={
        "console_scripts": ["pplex = pplex.cli:main"],
        "pplex.plugins": [f"{name} = pplex_plugins.{name}" for name in BUILTIN_PLUGINS],
    },
)
