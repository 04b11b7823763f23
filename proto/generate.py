"""Regenerates pplex's Python gRPC modules from proto/upstream.proto.

The generated modules are committed (pplex/_proto/) so that installing pplex
needs no code generator; tests/unit/test_proto.py regenerates them into a
temporary folder and fails if the committed ones drifted from the .proto.

    python proto/generate.py [OUTPUT_ROOT]

OUTPUT_ROOT defaults to the repository root; the modules land in
OUTPUT_ROOT/pplex/_proto/.
"""
import os
import sys

import grpc_tools
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Mapping the folder to the virtual path pplex/_proto makes the generated
# grpc module import "from pplex._proto import upstream_pb2", a package import.
VIRTUAL = "pplex/_proto"


def generate(output_root=ROOT):
    os.makedirs(os.path.join(output_root, VIRTUAL), exist_ok=True)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    status = protoc.main([
        "protoc",
        f"--proto_path={VIRTUAL}={HERE}",
        f"--proto_path={well_known}",
        f"--python_out={output_root}",
        f"--grpc_python_out={output_root}",
        f"{VIRTUAL}/upstream.proto",
    ])
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    return os.path.join(output_root, VIRTUAL)


if __name__ == "__main__":
    print(generate(sys.argv[1] if len(sys.argv) > 1 else ROOT))
