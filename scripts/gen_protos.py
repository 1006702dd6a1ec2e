"""Regenerate the gpufed.v1 stubs from proto/ (run by `make proto`).

Compiled with `-I proto`, so proto/gpufed/v1/x.proto becomes gpufed/v1/x_pb2.py and the generated
imports (`from gpufed.v1 import ...`) resolve without rewriting.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    out_root = Path(args_in[args_in.index("--out") + 1]) if "--out" in args_in else OUT_DIR
    return generate(out_root)


def generate(out_root: Path) -> int:
    (out_root / "gpufed" / "v1").mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "gpufed" / "v1").glob("*.proto"))
    for old in (out_root / "gpufed" / "v1").glob("*_pb2*.py*"):
        old.unlink()
    # The mypy plugins live beside the interpreter (the virtual environment's bin/).
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return int(code)
    init = out_root / "gpufed" / "v1" / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated gpufed.v1 stubs; regenerate with `make proto`."""\n')
    return 0


if __name__ == "__main__":
    sys.exit(main())
