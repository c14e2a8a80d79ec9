"""etcd's v3 KV API from Python, through stubs generated at bench time from etcd_kv.proto.

Why generated stubs rather than a client library: the etcd3 package is
unmaintained and breaks on current protobuf, and etcdctl or etcd's own Go
`benchmark` tool would put a Go client against our Python one. Stubs over the
same grpcio put both servers behind the same Python client stack, so the ratio
compares servers, not clients.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).parent


def generate(out_dir: str | None = None) -> str:
    """Compiles etcd_kv.proto into `out_dir` (a new temp dir by default) and returns it."""
    from grpc_tools import protoc

    target = out_dir or tempfile.mkdtemp(prefix="bench-etcd-stubs-")
    code = protoc.main(
        ["protoc", f"-I{HERE}", f"--python_out={target}", f"--grpc_python_out={target}", str(HERE / "etcd_kv.proto")]
    )
    if code != 0:
        raise RuntimeError("protoc failed on bench/etcd_kv.proto")
    return target


def load(stub_dir: str) -> tuple[ModuleType, ModuleType]:
    """(etcd_kv_pb2, etcd_kv_pb2_grpc) from a directory made by generate()."""
    if stub_dir not in sys.path:
        sys.path.insert(0, stub_dir)
    return importlib.import_module("etcd_kv_pb2"), importlib.import_module("etcd_kv_pb2_grpc")
