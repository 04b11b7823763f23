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
    packages=["pplex", "pplex._proto", "pplex.dashboard", "pplex_plugins"],
    package_dir={"pplex_plugins": "plugins"},
    package_data={"pplex.dashboard": ["index.html", "app.js", "style.css"]},  # the admin API's page
    install_requires=[
        "grpcio>=1.85.1",          # the gRPC bridge and the worker SDK
        "protobuf>=7.35.1,<8",     # what the committed generated code needs
        "pluggy>=1.5",             # the plugin hooks
        "bottle>=0.13",            # admin API routes
        "waitress>=3.0",           # admin API server
        "voluptuous>=0.14",        # config and request validation
        "prometheus_client>=0.20",  # GET /metrics
        "h2>=4.1,<5",              # the h2 transport (--transport h2): HTTP/2 in the reactor thread
        "google-crc32c>=1.5",      # PROXY v2 headers' CRC32C TLV (C, with a pure-Python fallback)
        "nats-py>=2.9,<3",         # cluster.broker nats://: the official NATS client (NATS core pub/sub)
        "redis>=5.0",              # cluster.broker redis://: the official Redis client (asyncio pub/sub)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "grpcio-tools==1.85.1",
                 "hypothesis>=6.100",  # fuzzing the parsers of outside bytes (PROXY headers)
                 "playwright>=1.40",   # drives Debian's Chromium in the dashboard tests
                 "PyYAML>=6",          # the test that checks the Kubernetes example manifests offline
                 "cryptography>=42"],  # the tests make their own CAs and certificates (tests/tlsutil.py)
    },
    entry_points={
        "console_scripts": ["pplex = pplex.cli:main"],
        "pplex.plugins": [f"{name} = pplex_plugins.{name}" for name in BUILTIN_PLUGINS],
    },
)
